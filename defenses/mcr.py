"""MCR, mode connectivity repair (Zhao et al., ICLR 2020; IBM/model-sanitization): a quadratic Bezier curve
from the backdoored weights (t = 0) to its fine-tuned version (t = 1), its one bend trained on the defender's
clean subset with t drawn anew for every batch; the defended model is the curve's point at a t chosen on the
defender's side (main_ft.py --defense mcr).

As the reference's backdoor-cifar train.py and data.loaders_part_test: the bend trained for 100 epochs of the
clean images tiled into 10,000-image epochs (~7,900 steps at batch 128), through the test transform (no crop, no
flip); BatchNorm's statistics re-estimated at each point on those batches (its update_bn).

The reference reads the point off the test curves; here a rule on the defender's side chooses it. A tenth of the
clean subset, drawn at random, is held out from everything MCR trains: the bend, and the curve's end, which is
FT's recipe run on the other nine tenths (not FT's teacher, which saw them). The backdoored end did see them: they
are its training images, which it fits better than images it never saw, as it fits its trigger. The rule reads
that memory: it walks from t = 0.1 towards the repaired end and takes the first point whose held-out loss is level
with the loss at t = 0.9 (per image, paired: the mean difference within +-2 standard errors), where what the
backdoored weights learned of their own training images has faded and the point fits unseen images as the repaired
side does (a loss above it: a point off the curve's low-loss path, as on a toy whose images all generalise); 0.9
if none. Its yardstick is 0.9, not the end: the ends' BatchNorm statistics, re-estimated on the curve's plain
batches as the reference does, do not fit weights trained under crop and flip (the zoo's BadNets model: test ACC
83.35 -> 69.05), so both ends score below the interior. Accuracy would not do: on GTSRB it is 100 along the whole
curve. The test ASR and ACC along the curve are recorded for the robustness picture only (curve_ASR, curve_ACC),
never read by the choice.
"""
import copy
import math
import os
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch.func import functional_call

import options as groups
from checkpoints import load_model
from config import DEFENSES
from defenses import clean_batches
from defenses.ft import check_student, finetune
from defenses.ft_at import fine_tuning_options
from device import autocast
from errors import UserError
from files import check_writable
from metrics import evaluate
from models import eval_mode
from subsets import seeded, test_subset
from training import Steps

KEYS = {'mcr': dict(label='MCR', needs=('end',))}  # its own end: FT's recipe on the part the rule does not read
# the point chosen; along the curve (PATH): the test ASR and ACC (recorded, never read), the held-out accuracy
# and loss the rule reads
FINDINGS = ('mcr_t', 'curve_ASR', 'curve_ACC', 'curve_held_out', 'curve_held_loss')

PATH = [i / 10 for i in range(11)]  # the points the curve is scored at
GRID = PATH[1:-1]                   # those t may be chosen from: the interior
SIGNIFICANT = 2.0                   # standard errors of the paired held-out loss difference still counted as level


def options(add):
    fine_tuning_options(add)
    groups.teacher(add, model_help="MCR: the curve's end, t = 1 (default: FT's recipe run on the nine tenths of the "
                   "subset the rule does not read, kept in mcr_end/ beside --output)")  # and its fine-tuning's numbers
    add('--mcr_held_out', type=float, minimum=0, help="MCR: share of the clean subset kept from the bend and the end "
        'to choose t on')
    add('--mcr_epoch_images', type=int, minimum=1, help="MCR: images per curve epoch, the rest of the subset tiled "
        "to this many (the reference's loader)")
    add('--mcr_t', help="MCR: the curve's point written as the model, or 'auto': the first of t = 0.1 ... 0.9 whose "
        "held-out loss is level with that at t = 0.9")


def check(args):
    try:
        assert args.mcr_t == 'auto' or 0 <= float(args.mcr_t) <= 1
    except (ValueError, AssertionError):
        raise UserError(f"--mcr_t must be 'auto' or a number in [0, 1], got '{args.mcr_t}'")


def bezier(t, start, bend, end):
    """The quadratic Bezier curve through start (t = 0) and end (t = 1) with control point bend."""
    return (1 - t) ** 2 * start + 2 * t * (1 - t) * bend + t ** 2 * end


@torch.no_grad()
def update_bn(model, batches, amp=False):
    """BatchNorm's running statistics recomputed from scratch on one pass of the batches (their exact mean over
    the batches, as the reference's update_bn on its training loader: the curve's plain images, as the bend is
    trained on). They do not fit the ends' weights, trained under crop and flip: the zoo's BadNets model scores
    69.05 test ACC with them, 83.35 with its own, 83.46 with statistics of crop + flip batches (results/log.md).
    The model is left in eval mode."""
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average
    model.train()
    for x, _ in batches:
        with autocast(x.device, amp):
            model(x)
    for m, momentum in zip(norms, momenta):
        m.momentum = momentum
    model.eval()


def split(n, share, seed):
    """(curve's, held-out) indices of an n-image subset: a seeded random `share` held out (the subset comes in
    class order, so its last tenth would be its last classes), each part in the subset's order."""
    order = torch.randperm(n, generator=seeded(seed, 'mcr-held-out'))
    held = max(1, round(n * share))
    return order[held:].sort().values, order[:held].sort().values


def tiled(x, y, n):
    """The reference's loader (data.loaders_part_test): the images repeated in order until there are n, the last
    copy cut short (its first images)."""
    idx = torch.arange(n, device=y.device) % len(y)
    return x[idx], y[idx]


@torch.no_grad()
def losses(model, x, y, normalizer, batch_size, amp=False):
    """Per-image cross-entropy of the uint8 images x at labels y, and whether each is classified right."""
    out = []
    with eval_mode(model):
        for i in range(0, len(x), batch_size):
            with autocast(x.device, amp):
                out.append(model(normalizer(x[i:i + batch_size])).float())
    logits = torch.cat(out)
    return F.cross_entropy(logits, y, reduction='none'), logits.argmax(1) == y


def first_faded(held_loss, grid=GRID, significant=SIGNIFICANT):
    """The rule: {t: per-image held-out losses} -> the first t of grid whose losses are level with those at grid's
    last point, the interior's nearest to the repaired end: neither significantly below (the suspect's memory of its
    training images) nor above (off the curve's low-loss path), the mean paired difference within +-significant
    standard errors; that last point where none is."""
    ref = held_loss[grid[-1]]
    for t in grid[:-1]:
        d = held_loss[t] - ref
        if d.mean().abs() <= significant * d.std() / math.sqrt(len(d)):
            return t
    return grid[-1]


def curve_end(ctx, x_fit, y_fit):
    """The curve's t = 1: --t_model as given, else FT's recipe run on the nine tenths (x_fit) and kept beside the
    output (made once, resumable; a rerun of the cell finds it). Frozen, in eval mode."""
    args = ctx.args
    out = ctx.paths['out']
    path = args.t_model or os.path.join(os.path.dirname(out), 'mcr_end', os.path.basename(out))
    ft = {k: v for k, v in DEFENSES['ft'].items() if k not in ('teacher_epochs', 'teacher_lr')}  # their options
    end_args = SimpleNamespace(**dict(vars(args), **ft))
    if args.t_model:
        print(f'MCR: the curve ends at {path} as given: the rule reads held-out images it must not have trained on')
    elif not os.path.exists(path):
        check_writable(path)
        print(f"MCR: fine-tuning the curve's end on {len(y_fit)} of the subset's images first ({path})")
        fitted = SimpleNamespace(**dict(vars(ctx), x=x_fit, y=y_fit))
        finetune(end_args, fitted, copy.deepcopy(ctx.model), path,
                 os.path.join(args.log_root, f'mcr-end_{ctx.s_name}.csv'), tag='mcr-end')
    end, meta = load_model(path, end_args, ctx.data.num_classes, ctx.device)
    check_student(meta, path, ctx)
    made = {k: v for k, v in meta.get('defense_args', {}).items() if k in ('seed', 'ratio', 'mcr_held_out')}
    if not args.t_model and made != {k: getattr(args, k) for k in made}:
        raise UserError(f'{path} was fitted on another part of the subset ({made}): delete it to make a new end')
    end.eval()
    end.requires_grad_(False)
    return end


def build(ctx):
    args, run = ctx.args, ctx
    model, data = run.model, run.data
    fit_idx, held_idx = split(len(run.y), args.mcr_held_out, args.seed)
    x_fit, y_fit, x_held, y_held = run.x[fit_idx], run.y[fit_idx], run.x[held_idx], run.y[held_idx]
    held = len(held_idx)
    end_model = curve_end(ctx, x_fit, y_fit)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    end = {n: p.detach().clone() for n, p in end_model.named_parameters()}
    with torch.no_grad():  # the reference's linear initialisation of the bend
        for n, p in model.named_parameters():
            p.copy_((start[n] + end[n]) / 2)
    batches = clean_batches(args, run, images=tiled(x_fit, y_fit, args.mcr_epoch_images))
    meta, drawn = {}, {}

    def curve_batches(epoch):  # each batch with its point of the curve, drawn from the epoch's own stream
        g = seeded(args.seed, f'mcr-t-{epoch}')
        for x, y in batches(epoch):
            drawn['t'] = float(torch.rand((), generator=g))
            yield x, y

    def loss(x, y):
        t = drawn['t']
        weights = {n: bezier(t, start[n], p, end[n]) for n, p in model.named_parameters()}
        return F.cross_entropy(functional_call(model, weights, (x,)).float(), y)

    def point(t, bend):
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.copy_(bezier(t, start[n], bend[n], end[n]))
        update_bn(model, batches(args.epochs), args.amp)  # one more epoch's batches, the same at every t

    def finish():
        bend = {n: p.detach().clone() for n, p in model.named_parameters()}
        monitor = test_subset(data.test, args.eval_subset, args.seed) if args.eval_subset else data.test
        held_loss, held_acc, test_acc, test_asr = {}, [], [], []
        for t in PATH:
            point(t, bend)
            held_loss[t], ok = losses(model, x_held, y_held, data.normalizer, args.eval_batch_size, args.amp)
            held_acc.append(round(100.0 * ok.float().mean().item(), 2))
            scores = evaluate(model, monitor, data.normalizer, args.eval_batch_size, args.amp)  # recorded, not read
            test_acc.append(scores['ACC'])
            test_asr.append(scores['ASR'])
            print(f'MCR t {t:.1f}: held-out accuracy {held_acc[-1]:.2f}, loss {held_loss[t].mean():.4f}; test ACC '
                  f'{scores["ACC"]:.2f}, ASR {scores["ASR"]:.2f} (recorded, not read)', flush=True)
        chosen = first_faded(held_loss) if args.mcr_t == 'auto' else float(args.mcr_t)
        point(chosen, bend)
        print(f"MCR: the curve's point t = {chosen:g} is the model ({held} held-out images)", flush=True)
        meta.update(mcr_t=chosen, curve_ASR=test_asr, curve_ACC=test_acc, curve_held_out=held_acc,
                    curve_held_loss=[round(held_loss[t].mean().item(), 4) for t in PATH])

    return Steps(batches=curve_batches, loss=loss, finish=finish, meta=meta)
