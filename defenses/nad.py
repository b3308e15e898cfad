"""NAD (Li et al., ICLR 2021): distil the backdoored student from its fine-tuned teacher (FT) by attention
transfer on the three groups, beside cross-entropy (main-ARGD.py --defense nad). ARGD distils the same
way with its own loss (defenses/argd.py).

Not in the papers (-SI, --source inverted): MCL's detection's pattern, a synthesised trigger, stamped on
--adv_share of each batch at true labels, seen by both networks.
"""
import torch
import torch.nn.functional as F

from adversarial import with_pattern_share
from at import nad_loss
from config import DEFENSES
from data_loader import Normalizer
from defenses import clean_batches
from inversion import synthesised_trigger
from training import Steps


def distill(args, run, student, teacher, criterion, extra_modules=None):
    """The distillation defenses' steps: cross-entropy + criterion(student features, teacher features) on
    the clean subset's batches (a synthesised trigger on a share of each with --source inverted: Steps.meta
    says which class's)."""
    def loss(x, y):
        logits, feats_s, _ = student(x, features=True)
        with torch.no_grad():
            _, feats_t, _ = teacher(x, features=True)
        return F.cross_entropy(logits, y) + criterion(feats_s, feats_t)

    recipe = DEFENSES[args.defense]
    batches, synthesised = clean_batches(args, run, recipe), {}
    if args.source == 'inverted':
        (pattern, synthesised), raw = synthesised_trigger(run, args.seed, args.amp), Normalizer('none', run.device)
        normalize = run.data.normalizer.normalize_float
        batches = lambda epoch: ((normalize(with_pattern_share(x01, pattern, args.adv_share)), y)
                                 for x01, y in clean_batches(args, run, recipe, raw)(epoch))
    return Steps(batches=batches, loss=loss, extra_modules=extra_modules or {}, meta=synthesised)


def options(add):
    add('--p', type=float, help='AT: power of |activation| in the attention map')
    add('--beta1', type=float, help='NAD: AT weight on group 1')
    add('--beta2', type=float, help='NAD: AT weight on group 2')
    add('--beta3', type=float, help='NAD: AT weight on group 3')


def build(args, run, teacher):
    betas = (args.beta1, args.beta2, args.beta3)
    return distill(args, run, run.model, teacher, lambda fs, ft: nad_loss(fs, ft, betas, args.p))
