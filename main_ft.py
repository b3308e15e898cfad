"""Erase a backdoor by fine-tuning past superficial safety: PAM (default), FST, SAU, or the blind
baselines FT-AT and FT-SI. Each sees only the defender's clean subset (--ratio); none is told the
trigger or the target.

    python main_ft.py --s_model weight/zoo/blended.tar --data_root /tmp/data/cifar10                # PAM
    python main_ft.py --defense fst --s_model weight/zoo/sig-cl.tar --data_root /tmp/data/cifar10
    python main_ft.py --defense ft-at --s_model weight/zoo/blended.tar --data_root /tmp/data/cifar10
    python main_ft.py --defense ft-at --source inverted --s_model weight/zoo/blended.tar ...       # FT-SI

- ft-at: FT's recipe (train_teacher.py) with --adv_share of each batch replaced by untargeted PGD images
  (L_inf --adv_eps) of the model as given (--adv_against original) at their true labels; with --source
  inverted (FT-SI) the share is stamped instead with MCL's detection's pattern, a synthesised trigger.
- pam: the same images, the cross-entropy gradient taken --rho towards the backdoored weights (Min et
  al., NeurIPS 2024); SGD lr 0.01, momentum 0.1, 30 epochs, batch 128.
- fst: re-initialised head, cross-entropy + --alpha <W, W_orig>, the head's norm kept (Min et al.,
  NeurIPS 2023); SGD lr 0.01, momentum 0.9, cosine over 10 epochs, batch 128.
- sau: shared adversarial unlearning (Wei et al., NeurIPS 2023); Adam lr 1e-4, cosine, batch 256, BN
  frozen, 12 epochs (the reference's 100 do not fit 5 minutes here).
Recipes: config.FT_RECIPES; a flag (--epochs, --lr, --batch_size, --momentum, --weight_decay) overrides
its number. The final model goes to <checkpoint_root>/<tag>_net/<s_name>.tar (never picked by test
metrics), the per-epoch CSV to <log_root>/<tag>_<s_name>.csv; tag = the defense, ft-si or pam-si.
"""
import copy
import os
import time

import torch
import torch.nn.functional as F

from cli import main_guard, parse_args
from config import DEFENSE_SCHEDULES, FT_RECIPES
from data_loader import Normalizer, seeded, train_batches
from files import check_writable
from mcl import synthesised_trigger
from purify import (fst_penalty, keep_norm, path_aware, pgd_untargeted, reinit_head, shared_pgd,
                    shared_unlearning_loss, with_adversarial_share, with_pattern_share)
from utils import autocast, cosine_lr, defender_check, defense_meta, defense_setup, fit, predict, step_lr, summary_line

RECIPE_OPTIONS = ('epochs', 'lr', 'batch_size', 'momentum', 'weight_decay')


def apply_recipe(args):
    """The defense's published numbers, where no flag gave one; returns the recipe."""
    recipe = FT_RECIPES[args.defense]
    for name in RECIPE_OPTIONS:
        if name not in args.given:
            setattr(args, name, recipe[name])
    return recipe


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


def run_tag(args):
    """The run's name in files and logs: the defense, or ft-si / pam-si with a synthesised trigger."""
    if args.defense in ('ft-at', 'pam') and args.source == 'inverted':
        return 'ft-si' if args.defense == 'ft-at' else 'pam-si'
    return args.defense


def lr_schedule(args, recipe):
    if recipe['schedule'] == 'finetune':  # FT's: /10 from epoch 2
        s = DEFENSE_SCHEDULES['finetune']
        return lambda epoch: step_lr(args.lr, epoch, s['milestones'], s['factors'])
    if recipe['schedule'] == 'cosine':
        return lambda epoch: cosine_lr(args.lr, epoch, args.epochs)
    return lambda epoch: args.lr


def main():
    args = parse_args('main_ft.py', description=__doc__.split('\n\n')[0])
    recipe = apply_recipe(args)
    t0 = time.time()
    run = defense_setup(args)
    model, data = run.model, run.data
    tag = run_tag(args)
    out = args.output or os.path.join(args.checkpoint_root, f'{tag}_net', f'{run.s_name}.tar')
    csv_path = os.path.join(args.log_root, f'{tag}_{run.s_name}.csv')
    for path in (out, csv_path):
        check_writable(path)

    raw = Normalizer('none', run.device)  # batches in [0,1]: perturbations are added before normalising
    norm = data.normalizer.normalize_float
    batches = lambda epoch: train_batches(run.x, run.y, args.batch_size, raw, args.seed, epoch,
                                          augment_data=recipe['augment'], cutout=recipe['cutout'],
                                          drop_last=recipe['drop_last'], crop_flip=data.crop_flip)
    loss_fn = lambda x01, y: F.cross_entropy(model(norm(x01)), y)
    gradient_point, after_step, synthesised = None, None, {}
    torch.manual_seed(args.seed)

    if args.defense in ('ft-at', 'pam'):
        clean_batches = batches
        pattern, synthesised = synthesised_trigger(run, args.seed, args.amp) if args.source == 'inverted' else (None, {})
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
        if args.defense == 'pam':
            gradient_point = path_aware(model, args.rho)
    elif args.defense == 'fst':
        head = model.fc
        w_orig, head_norm = head.weight.detach().clone(), head.weight.detach().float().norm()
        reinit_head(head, seeded(args.seed, 'fst-head'))
        loss_fn = lambda x01, y: F.cross_entropy(model(norm(x01)), y) + fst_penalty(head.weight, w_orig, args.alpha)
        after_step = lambda: keep_norm(head.weight, head_norm)  # after every step, as the reference
    else:  # sau
        reference = copy.deepcopy(model).eval().requires_grad_(False)

        def loss_fn(x01, y):
            model.eval()  # BN frozen, as the reference's default (train_mode off)
            x_adv = shared_pgd(model, reference, x01, y, norm, args.adv_eps, args.adv_eps, args.adv_steps,
                               args.sau_beta_adv, args.sau_beta_shared)
            logits, logits_adv = model(norm(torch.cat([x01, x_adv]))).float().chunk(2)
            with torch.no_grad():
                ref_clean, ref_adv = reference(norm(torch.cat([x01, x_adv]))).argmax(1).chunk(2)
            return F.cross_entropy(logits, y) + args.sau_lmd_shared * shared_unlearning_loss(logits_adv, ref_adv, y,
                                                                                              ref_clean)

    metrics = fit(args, model, loss_fn, batches, lr_schedule(args, recipe), data.test, data.normalizer, out_path=out,
                  csv_path=csv_path, meta=dict(defense_meta(run.meta, args, tag), **synthesised),
                  nesterov=recipe['nesterov'], evaluate_first=True, tag=tag, optimizer=recipe['optimizer'],
                  gradient_point=gradient_point, after_step=after_step)
    metrics.update(synthesised)  # which class's pattern FT-SI / PAM-SI stamped (in the JSON summary and the meta)
    defender_check(run, model, args, metrics)
    print(f'saved {out} ({time.time() - t0:.0f}s); log {csv_path}')
    print(summary_line(metrics, args.json))


if __name__ == '__main__':
    main_guard(main)
