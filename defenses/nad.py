"""NAD (Li et al., ICLR 2021): distil the backdoored student from its fine-tuned teacher (FT) by attention
transfer on the three groups, beside cross-entropy (main-ARGD.py --defense nad). ARGD distils the same
way with its own loss (defenses/argd.py).

Not in the papers (-SI, --source inverted): MCL's detection's pattern, a synthesised trigger, stamped on
--adv_share of each batch at true labels, seen by both networks.
"""
import os

import torch
import torch.nn.functional as F

import options as groups
from adversarial import with_pattern_share
from at import nad_loss
from batching import Normalizer
from defenses import clean_batches
from inversion import synthesised_trigger
from training import Steps

KEYS = {'nad': dict(label='NAD', needs=('teacher',))}
FINDINGS = ('detected', 'anomaly_index')  # with --source inverted: the synthesised trigger's detection


def distillation_options(add):
    """What NAD and ARGD both read: the schedule, the teacher, the attention maps and the -SI share."""
    groups.schedule(add)
    groups.recipe(add)
    groups.teacher(add)
    groups.attention(add)
    groups.share(add)
    groups.source(add)


def distillation_names(name):
    """NAD's and ARGD's file names: <s_name>[-nad][-si].tar in erasing_net/, as main-ARGD.py has always written."""
    si = lambda args: '-si' if args.source == 'inverted' else ''
    return (lambda args: f'{name}{si(args)}', lambda args: name,
            lambda args, s_name: os.path.join(args.checkpoint_root, 'erasing_net',
                                              f"{s_name}{'' if name == 'argd' else '-' + name}{si(args)}.tar"))


tag, meta_name, output = distillation_names('nad')


def distill(args, run, student, teacher, criterion, extra_modules=None):
    """The distillation defenses' steps: cross-entropy + criterion(student features, teacher features) on
    the clean subset's batches (a synthesised trigger on a share of each with --source inverted: Steps.meta
    says which class's)."""
    def loss(x, y):
        logits, feats_s, _ = student(x, features=True)
        with torch.no_grad():
            _, feats_t, _ = teacher(x, features=True)
        return F.cross_entropy(logits, y) + criterion(feats_s, feats_t)

    batches, synthesised = clean_batches(args, run), {}
    if args.source == 'inverted':
        (pattern, synthesised), raw = synthesised_trigger(run, args), Normalizer('none', run.device)
        normalize = run.data.normalizer.normalize_float
        batches = lambda epoch: ((normalize(with_pattern_share(x01, pattern, args.adv_share)), y)
                                 for x01, y in clean_batches(args, run, raw)(epoch))
    return Steps(batches=batches, loss=loss, extra_modules=extra_modules or {}, meta=synthesised)


def options(add):
    distillation_options(add)
    add('--beta1', type=float, help='NAD: AT weight on group 1')
    add('--beta2', type=float, help='NAD: AT weight on group 2')
    add('--beta3', type=float, help='NAD: AT weight on group 3')


def build(ctx):
    args = ctx.args
    betas = (args.beta1, args.beta2, args.beta3)
    return distill(args, ctx, ctx.model, ctx.teacher, lambda fs, ft: nad_loss(fs, ft, betas, args.p))
