"""FST, feature-shift tuning (Min et al., NeurIPS 2023): a re-initialised linear head, cross-entropy plus
alpha <W, W_orig>, and the head's norm put back to the original one after every step
(main_ft.py --defense fst).
"""
import math

import torch
import torch.nn.functional as F

from defenses.ft_at import fine_tuning_options, raw_batches
from subsets import seeded
from training import Steps

KEYS = {'fst': dict(label='FST')}


def options(add):
    fine_tuning_options(add)
    add('--alpha', type=float, minimum=0, help='FST: weight of the inner product of the new head with the original head')


def build(ctx):
    args, run = ctx.args, ctx
    model, norm = run.model, run.data.normalizer.normalize_float
    head = model.fc
    w_orig, head_norm = head.weight.detach().clone(), head.weight.detach().float().norm()
    reinit_head(head, seeded(args.seed, 'fst-head'))
    return Steps(batches=raw_batches(args, run),
                 loss=lambda x01, y: F.cross_entropy(model(norm(x01)), y) + fst_penalty(head.weight, w_orig, args.alpha),
                 after_step=lambda: keep_norm(head.weight, head_norm))  # after every step, as the reference


def reinit_head(head, generator):
    """FST's re-initialised linear classifier: weight and bias uniform in +-1/sqrt(fan_in)."""
    bound = 1 / math.sqrt(head.weight.shape[1])
    with torch.no_grad():
        for p in (head.weight, head.bias):
            p.copy_((torch.rand(p.shape, generator=generator) * 2 - 1).to(p.device) * bound)


def fst_penalty(weight, weight_orig, alpha):
    """alpha * <W, W_orig>: minimising it turns the new head away from the backdoored one."""
    return alpha * (weight.float() * weight_orig.float()).sum()


@torch.no_grad()
def keep_norm(weight, norm):
    """Rescale the head's weight back to the original head's Frobenius norm (after every step)."""
    weight.mul_(norm / weight.float().norm().clamp(min=1e-12))
