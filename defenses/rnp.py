"""RNP, reconstructive neuron pruning (Li et al., ICML 2023; bboylyg/RNP main.py): unlearn the model by gradient
ascent on its clean data until its accuracy there falls to the floor (rnp_floor), learn masks on its BatchNorm
neurons that recover it (alpha CE, masks only, in [0, 1]), then prune the neurons of the model as given whose mask is
at most the threshold (their BatchNorm weight set to 0) (main_ft.py --defense rnp).

Its data is the reference's share of the training set (--rnp_ratio: 500 CIFAR-10 images, as its README runs it), the
first images of the seeded draw the defender's subset is cut from, so a part of that subset; its steps a pass are the
reference's. On the whole 5% subset each pass ran 5 times the steps and the recovery 400 steps, not 80: the first six
zoo cells so pruned 59-159 of WRN-16-1's 464 neurons, each warned (results/log.md). The defender's check reads the
whole subset.

The unlearning is its own short loop (at most rnp_unlearn_epochs + 1 passes, stopped by the floor; deterministic on
the CPU, so a resumed run repeats it); the recovery runs through the one training loop (--epochs, --lr: the masks'),
with ANP's masked BatchNorm (weight x mask). The reference clips the unlearning's gradient norm before its backward
pass, where there is no gradient yet: no clipping, as it runs. Its pruning is a table of thresholds scored on the
test sets; here the one threshold rnp_threshold, the defender's check warning where the pruning costs its accuracy.
"""
import torch
import torch.nn.functional as F

from defenses import clean_batches
from defenses.anp import prune_by_masks, wrap
from defenses.ft_at import fine_tuning_options
from device import autocast
from options import numbers
from training import Steps
from utils import schedule, step_lr

KEYS = {'rnp': dict(label='RNP')}
FINDINGS = ('rnp_pruned', 'rnp_unlearn_epochs')  # neurons pruned, unlearning passes run


def options(add):
    fine_tuning_options(add)  # the recovery: --epochs, --lr (the masks'), ...
    add('--rnp_ratio', type=float, minimum=0, help="RNP: its data, a share of the training set (at most --ratio): "
        "the first of the defender's subset's seeded draw")
    add('--rnp_unlearn_lr', type=float, minimum=0, help='RNP: SGD lr of the unlearning (gradient ascent)')
    add('--rnp_unlearn_epochs', type=int, minimum=0, help='RNP: most unlearning passes, after the first')
    add('--rnp_unlearn_milestones', type=numbers, help='RNP: unlearning passes where its lr is divided by 10')
    add('--rnp_unlearn_weight_decay', type=float, minimum=0, help='RNP: weight decay of the unlearning')
    add('--rnp_floor', type=float, minimum=0, help="RNP: stop unlearning once a pass's accuracy on the subset is at "
        'most this (a fraction)')
    add('--rnp_alpha', type=float, minimum=0, help="RNP: weight of the recovery's cross-entropy")
    add('--rnp_threshold', type=float, minimum=0, help='RNP: prune the neurons whose mask is at most this')


def unlearn(model, batches, args, device):
    """Gradient ascent on the cross-entropy until a pass's running accuracy is at most rnp_floor; returns the
    number of passes run."""
    opt = torch.optim.SGD(model.parameters(), lr=args.rnp_unlearn_lr, momentum=args.momentum,
                          weight_decay=args.rnp_unlearn_weight_decay)
    model.train()
    factors = tuple(0.1 ** i for i in range(len(args.rnp_unlearn_milestones) + 1))
    for epoch in range(args.rnp_unlearn_epochs + 1):
        for group in opt.param_groups:
            group['lr'] = step_lr(args.rnp_unlearn_lr, epoch, args.rnp_unlearn_milestones, factors)
        correct, seen = 0, 0
        for x, y in batches(epoch):
            opt.zero_grad(set_to_none=True)
            with autocast(device, args.amp):
                out = model(x)
                loss = F.cross_entropy(out, y)
            (-loss).backward()
            opt.step()
            correct += int((out.argmax(1) == y).sum())
            seen += len(y)
        acc = correct / max(seen, 1)
        print(f'RNP unlearning pass {epoch + 1}: accuracy on the subset {100 * acc:.2f} (stop at '
              f'{100 * args.rnp_floor:g})', flush=True)
        if acc <= args.rnp_floor:
            return epoch + 1
    return args.rnp_unlearn_epochs + 1


def build(ctx):
    args, run = ctx.args, ctx
    model = run.model
    original = {k: v.clone() for k, v in model.state_dict().items()}
    share = min(args.rnp_ratio, args.ratio)
    images = run.data.clean_subset(share, args.seed, run.device)  # a prefix of the subset's draw: part of run.x
    print(f"RNP: {len(images[1])} of the defender's {len(run.y)} clean images ({share:g} of train)", flush=True)
    batches = clean_batches(args, run, images=images)
    passes = unlearn(model, batches, args, run.device)
    model.requires_grad_(False)
    masks = wrap(model)

    def clip():
        with torch.no_grad():
            for m in masks.values():
                m.neuron_mask.clamp_(0, 1)
    meta = {'rnp_unlearn_epochs': passes}

    def finish():  # prune the model as given by the recovered masks
        meta['rnp_pruned'] = prune_by_masks(model, masks, original, args.rnp_threshold, 'RNP')
    return Steps(batches=batches, loss=lambda x, y: args.rnp_alpha * F.cross_entropy(model(x), y), after_step=clip,
                 finish=finish, meta=meta,
                 lr_at=schedule(args.schedule, args.lr, args.epochs, args.milestones, args.factors))
