"""FT-AT: FT's recipe with a share of each batch replaced by untargeted PGD images of the model as given
(--adv_against original) at their true labels; the blind baseline every fine-tuning defense must beat
(main_ft.py --defense ft-at). FT-SI (--defense ft-si, or --source inverted) stamps that share instead with
MCL's detection's pattern, a synthesised trigger.
"""
import copy

import torch
import torch.nn.functional as F

import options as groups
from adversarial import pgd_untargeted, with_adversarial_share, with_pattern_share
from batching import Normalizer
from defenses import clean_batches
from device import autocast
from inversion import synthesised_trigger
from metrics import predict
from subsets import seeded
from training import Steps

KEYS = {'ft-at': dict(label='FT-AT'), 'ft-si': dict(label='FT-SI')}  # FT-SI: --source inverted
FINDINGS = ('detected', 'anomaly_index')  # with --source inverted: the synthesised trigger's detection


def tag(args):
    """ft-si with the synthesised trigger, whichever key chose it."""
    return 'ft-si' if args.source == 'inverted' else 'ft-at'


def pgd_options(add):
    """The PGD bound and steps (SAU's shared PGD reads them too)."""
    add('--adv_eps', type=float, minimum=0, help='L_inf bound of the PGD perturbations, in [0,1]-pixel units')
    add('--adv_steps', type=int, minimum=1, help='PGD steps')


def fine_tuning_options(add):
    """What every fine-tuning defense of main_ft.py reads: the schedule and the recipe."""
    groups.schedule(add)
    groups.recipe(add)


def options(add):
    """Its command-line options (their defaults: its config.DEFENSES entry)."""
    fine_tuning_options(add)
    groups.share(add)
    groups.source(add)
    add('--adv_against', choices=('original', 'current'), help="FT-AT/PAM: PGD against the model as given, or as "
        'it is being tuned')
    pgd_options(add)
    add('--adv_step', type=float, minimum=0, help='FT-AT/PAM: PGD step size')


def raw_batches(args, run):
    """The recipe's batches of the clean subset in [0,1] (perturbations are added before normalising)."""
    return clean_batches(args, run, Normalizer('none', run.device))


def build(ctx):
    return share_steps(ctx.args, ctx)


def share_steps(args, run):
    """FT's steps with the share of each batch: PGD images, or the synthesised trigger (--source inverted)."""
    model, norm = run.model, run.data.normalizer.normalize_float
    clean_batches = raw_batches(args, run)
    pattern, synthesised = synthesised_trigger(run, args) if args.source == 'inverted' else (None, {})
    # PGD against the model as given: its adversarial directions are the backdoor's (on the zoo's Blended
    # model 244 of 256 land on the target); the model being purified soon has only generic ones
    if pattern is None:
        attacked = copy.deepcopy(model).eval().requires_grad_(False) if args.adv_against == 'original' else model
        report_pgd_labels(attacked, run, norm, args)

    def batches(epoch):  # PGD against the weights as they are, before PAM moves them for its gradient
        g = seeded(args.seed, f'pgd-{epoch}', run.device)  # the random starts: per epoch, so a resumed run repeats them
        for x01, y in clean_batches(epoch):
            if pattern is not None:
                x01 = with_pattern_share(x01, pattern, args.adv_share)
            else:
                with autocast(run.device, args.amp):  # left before yielding: autocast state is per thread
                    x01 = with_adversarial_share(attacked, x01, y, norm, args.adv_share, args.adv_eps,
                                                 args.adv_step, args.adv_steps, g)
            yield x01, y
    return Steps(batches=batches, loss=lambda x01, y: F.cross_entropy(model(norm(x01)), y), meta=synthesised)


def report_pgd_labels(model, run, norm, args):
    """Where the PGD images of the first clean images land (a defender-side reading: a backdoored model's
    adversarial examples gather on its target)."""
    x01 = run.x[:256].permute(0, 3, 1, 2).float() / 255
    g = seeded(args.seed, 'pgd-report', run.device)
    with autocast(run.device, args.amp):
        adv = pgd_untargeted(model, x01, run.y[:256], norm, args.adv_eps, args.adv_step, args.adv_steps, g)
        labels = predict(model, adv, norm, args.eval_batch_size, args.amp)
    counts = torch.bincount(labels, minlength=run.data.num_classes)
    top = int(counts.argmax())
    print(f'PGD images of {len(labels)} clean images land on class {top} for {int(counts[top])} of them '
          f'(per class: {counts.tolist()})', flush=True)
