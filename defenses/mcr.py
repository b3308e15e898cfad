"""MCR, mode connectivity repair (Zhao et al., ICLR 2020; IBM/model-sanitization): a quadratic Bezier curve
from the backdoored weights (t = 0) to its fine-tuned version, FT's teacher (t = 1), its one bend trained on
the defender's clean subset with t drawn anew for every batch; the defended model is the curve's point at a t
chosen on the defender's side (main_ft.py --defense mcr).

The reference reads the test accuracy along t; here t is the grid point 0.5 ... 0.9 with the best accuracy on a
held-out tenth of the clean subset, which the curve's bend never trains on, BatchNorm's statistics re-estimated
at each point (the reference's update_bn). Only the half nearer the repaired end: the defender knows t = 0 is
the suspect model, and both ends were trained on these images (they are training images; the teacher saw
them), so their accuracy is highest next to either end and cannot tell the backdoor's region apart. The test ASR along the curve is recorded
for the robustness picture only (curve_ASR in the summary), never read by the choice.
"""
import torch
import torch.nn.functional as F
from torch.func import functional_call

import options as groups
from defenses import clean_batches
from defenses.ft_at import fine_tuning_options
from device import autocast
from errors import UserError
from metrics import accuracy, evaluate
from subsets import seeded, test_subset
from training import Steps

KEYS = {'mcr': dict(label='MCR', needs=('teacher',))}  # the curve's end: FT's teacher
FINDINGS = ('mcr_t', 'curve_ASR')  # the point chosen, the test ASR along the curve (recorded, never read)

GRID = [i / 10 for i in range(5, 10)]  # the points t may be chosen from: the interior half nearer the repaired end
PATH = [i / 10 for i in range(11)]      # where the test ASR along the curve is recorded


def options(add):
    fine_tuning_options(add)
    groups.teacher(add)  # the curve's end (t = 1)
    add('--mcr_held_out', type=float, minimum=0, help="MCR: share of the clean subset kept from the curve to choose "
        't on')
    add('--mcr_t', help="MCR: the curve's point written as the model, or 'auto': of t = 0.5 ... 0.9 the best on the "
        "held-out tenth of the defender's subset")


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
    """BatchNorm's running statistics recomputed from scratch on one pass of the training batches (their exact
    mean over the batches, as the reference's update_bn on its training loader: augmented, as the statistics
    the model was trained with; the plain images gave the backdoored model's own weights 61% instead of 95% on
    the held-out tenth); the model is left in eval mode."""
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


def build(ctx):
    args, run, teacher = ctx.args, ctx, ctx.teacher
    model, data = run.model, run.data
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    end = {n: p.detach().clone() for n, p in teacher.named_parameters()}
    held = max(1, round(len(run.y) * args.mcr_held_out))  # the subset is in random order: its last tenth
    x_fit, y_fit, x_held, y_held = run.x[:-held], run.y[:-held], run.x[-held:], run.y[-held:]
    with torch.no_grad():  # the reference's linear initialisation of the bend
        for n, p in model.named_parameters():
            p.copy_((start[n] + end[n]) / 2)
    batches = clean_batches(args, run, images=(x_fit, y_fit))
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
        update_bn(model, batches(args.epochs), args.amp)  # one more draw of the augmentation, the same at every t

    def finish():
        bend = {n: p.detach().clone() for n, p in model.named_parameters()}
        held_acc = {}
        for t in GRID:
            point(t, bend)
            held_acc[t] = accuracy(model, x_held, y_held, data.normalizer, args.eval_batch_size, args.amp)
        chosen = max(GRID, key=lambda t: (held_acc[t], -abs(t - 0.5))) if args.mcr_t == 'auto' else float(args.mcr_t)
        print('MCR held-out accuracy along the curve: ' + ' '.join(f't {t:.1f}: {a:.1f}' for t, a in held_acc.items()))
        monitor = test_subset(data.test, args.eval_subset, args.seed) if args.eval_subset else data.test
        path = []
        for t in PATH:  # for the picture only: the test ASR along the curve
            point(t, bend)
            path.append(round(evaluate(model, monitor, data.normalizer, args.eval_batch_size, args.amp)['ASR'], 2))
        print('MCR test ASR along the curve (recorded, not read): ' + ' '.join(
            f't {t:.1f}: {a:.1f}' for t, a in zip(PATH, path)))
        point(chosen, bend)
        print(f"MCR: the curve's point t = {chosen:g} is the model ({held} held-out images)", flush=True)
        meta.update(mcr_t=chosen, curve_ASR=path, curve_held_out=[round(held_acc[t], 2) for t in GRID])

    return Steps(batches=curve_batches, loss=loss, finish=finish, meta=meta)
