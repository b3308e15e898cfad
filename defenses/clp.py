"""CLP, channel Lipschitzness-based pruning (Zheng et al., ECCV 2022; rkteddy/channel-Lipschitzness-based-pruning):
data-free. Each convolution's output channels get an upper bound of their Lipschitz constant (UCLC); in each layer
the channels above mean + u std of its bounds are pruned (main_ft.py --defense clp). No data and, as the paper, no
fine-tuning (--epochs 0); --epochs N fine-tunes the pruned model on the clean subset with the pruned weights kept
at zero.

The bound. The reference pairs each convolution with the BatchNorm after it (conv -> BN -> ReLU, post-activation):
channel k's map is x -> (gamma_k / sigma_k) (W_k * x) + const, so its UCLC is |gamma_k| / sigma_k times the
spectral norm of W_k reshaped to (in, kh kw), and pruning zeroes gamma_k and beta_k. A WideResNet is pre-activation
(BN -> ReLU -> conv): no BN follows a convolution alone (conv2's output joins the shortcut before the next block's
BN), and the reference's pairing would match a convolution with the BN of the next block. There channel k's map is
x -> W_k * ReLU(gamma / sigma (x - mu) + beta): BN scales input channel j by gamma_j / sigma_j and ReLU is
1-Lipschitz, so its UCLC is the spectral norm of W_k with row j (input channel j) scaled by |gamma_j| / sigma_j
(the stem, reading the image, unscaled), and pruning zeroes W_k, which sets the channel's output to 0 as the
reference's zeroed BN does. sigma = sqrt(running_var), without BN's eps, as the reference.
"""
import torch
import torch.nn.functional as F

from defenses import clean_batches
from defenses.ft_at import fine_tuning_options
from models.wresnet import BasicBlock as PreActBlock
from models.wresnet import WideResNet
from training import Steps

KEYS = {'clp': dict(label='CLP')}
FINDINGS = ('clp_pruned',)  # channels pruned, over every layer


def options(add):
    fine_tuning_options(add)
    add('--clp_u', type=float, minimum=0, help='CLP: prune the channels whose bound is above mean + u std of their layer')


def layers(model):
    """(conv, bn, order) of every convolution CLP bounds: order 'pre' where bn comes before it (its input is
    ReLU(bn(.)); bn None: the stem), 'post' where bn follows it (the reference's pairing)."""
    if isinstance(model, WideResNet):
        out = [(model.conv1, None, 'pre')]
        for block in model.modules():
            if isinstance(block, PreActBlock):
                out += [(block.conv1, block.bn1, 'pre'), (block.conv2, block.bn2, 'pre')]
                if block.convShortcut is not None:
                    out.append((block.convShortcut, block.bn1, 'pre'))
        return out
    out, conv = [], None
    for m in model.modules():  # the reference's walk: a BN pairs with the convolution just before it
        if isinstance(m, torch.nn.Conv2d):
            conv = m
        elif isinstance(m, torch.nn.BatchNorm2d) and conv is not None:
            out.append((conv, m, 'post'))
            conv = None
    return out


@torch.no_grad()
def channel_bounds(conv, bn, order):
    """Each output channel's UCLC (see the module's docstring), float64."""
    w = conv.weight.detach().double()
    if bn is not None:
        scale = (bn.weight.detach().double() / bn.running_var.detach().double().sqrt()).abs()
        w = w * (scale[:, None, None, None] if order == 'post' else scale[None, :, None, None])
    return torch.linalg.matrix_norm(w.reshape(w.shape[0], w.shape[1], -1), ord=2)


@torch.no_grad()
def prune(model, u):
    """Zero the channels above mean + u std (unbiased, as torch's) of their layer's bounds; returns the zeroed
    tensors and their masks [(tensor, mask over dim 0)] and the count."""
    zeroed, total = [], 0
    for conv, bn, order in layers(model):
        bounds = channel_bounds(conv, bn, order)
        mask = bounds > bounds.mean() + u * bounds.std()
        if not mask.any():
            continue
        total += int(mask.sum())
        targets = (conv.weight,) if order == 'pre' else (bn.weight, bn.bias)
        for t in targets:
            m = mask.to(t.device)
            t[m] = 0
            zeroed.append((t, m))
    return zeroed, total


def build(ctx):
    args, run = ctx.args, ctx
    model = run.model
    zeroed, total = prune(model, args.clp_u)
    print(f'CLP: {total} channels pruned (UCLC above mean + {args.clp_u:g} std of their layer)')

    def keep_pruned():
        with torch.no_grad():
            for t, m in zeroed:
                t[m] = 0
    return Steps(batches=clean_batches(args, run), loss=lambda x, y: F.cross_entropy(model(x), y),
                 after_step=keep_pruned, meta={'clp_pruned': total})
