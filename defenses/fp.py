"""FP, fine-pruning (Liu, Dolan-Gavitt & Garg, RAID 2018), as BackdoorBench's defense/fp.py runs it: the channels
of the last convolutional layer (the pooled features the linear head reads) ranked by their mean activation on
the defender's clean subset, pruned from the most dormant up in steps of fp_step of the channels, as long as the
defender's accuracy on that subset stays within fp_acc_ratio (relative) of the unpruned model's; then the pruned
model fine-tuned on the subset (main_ft.py --defense fp).

A pruned channel is a zero column of the head's weight, kept zero through the fine-tuning (the architecture
unchanged: every script loads the model). Where BackdoorBench departs from its own rule, this follows the rule:
it scores each pruning on the clean test set (here the defender's subset), prunes one channel fewer than it counts
(seq_sort[0:num_pruned - 1]) and keeps the pruning that broke the bound (its last_net is the network it goes on
masking); here the largest pruning within the bound is kept.
"""
import math

import torch
import torch.nn.functional as F

from defenses import clean_batches
from defenses.ft_at import fine_tuning_options
from device import autocast
from metrics import accuracy
from models import eval_mode
from training import Steps

KEYS = {'fp': dict(label='FP')}
FINDINGS = ('fp_pruned', 'fp_subset_acc')  # channels pruned, the defender's accuracy after pruning (before tuning)


def options(add):
    fine_tuning_options(add)
    add('--fp_acc_ratio', type=float, minimum=0, help="FP: prune while the defender's clean accuracy stays within this "
        "share of the unpruned model's (relative)")
    add('--fp_step', type=float, minimum=0, help="FP: channels pruned per step, as a share of the layer's (rounded up)")


def head(model):
    """The linear layer reading the pooled features (WRN's fc, ResNet's linear): the model's last nn.Linear."""
    return [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]


@torch.no_grad()
def mean_activation(model, x, normalizer, batch_size, amp=False):
    """Each pooled feature channel's mean over uint8 images x, in eval mode."""
    total = None
    with eval_mode(model):
        for i in range(0, len(x), batch_size):
            with autocast(x.device, amp):
                pooled = model(normalizer(x[i:i + batch_size]), features=True)[2].float()
            total = pooled.sum(0) if total is None else total + pooled.sum(0)
    return total / len(x)


def prune_dormant(model, x, y, normalizer, acc_ratio, step, batch_size, amp=False, log=print):
    """Zero the head's columns of the most dormant channels, step by step, while the accuracy on (x, y) stays
    within acc_ratio of the unpruned one; returns (the pruned channels' mask, accuracy after pruning)."""
    fc = head(model)
    order = torch.argsort(mean_activation(model, x, normalizer, batch_size, amp).cpu(), stable=True)
    original = fc.weight.detach().clone()
    base = accuracy(model, x, y, normalizer, batch_size, amp)
    n, stride = len(order), max(1, math.ceil(len(order) * step))
    kept, kept_acc = 0, base
    for count in range(stride, n, stride):  # never every channel (the reference's range stops short of it)
        with torch.no_grad():
            fc.weight.copy_(original)
            fc.weight[:, order[:count].to(fc.weight.device)] = 0
        acc = accuracy(model, x, y, normalizer, batch_size, amp)
        if abs(acc - base) / max(base, 1e-12) >= acc_ratio:
            break
        kept, kept_acc = count, acc
    pruned = torch.zeros(n, dtype=torch.bool)
    pruned[order[:kept]] = True
    with torch.no_grad():
        fc.weight.copy_(original)
        fc.weight[:, pruned.to(fc.weight.device)] = 0
    log(f'FP: {kept} of {n} channels pruned (most dormant first), defender\'s accuracy {base:.2f} -> {kept_acc:.2f} '
        f'(bound: {100 * acc_ratio:g}% of it)')
    return pruned, kept_acc


def build(ctx):
    args, run = ctx.args, ctx
    model = run.model
    pruned, acc = prune_dormant(model, run.x, run.y, run.data.normalizer, args.fp_acc_ratio, args.fp_step,
                                args.eval_batch_size, args.amp)
    fc = head(model)
    mask = pruned.to(fc.weight.device)

    def keep_pruned():  # after every step: the pruned columns stay zero (momentum and weight decay move them)
        with torch.no_grad():
            fc.weight[:, mask] = 0
    return Steps(batches=clean_batches(args, run), loss=lambda x, y: F.cross_entropy(model(x), y),
                 after_step=keep_pruned, meta={'fp_pruned': int(pruned.sum()), 'fp_subset_acc': acc})
