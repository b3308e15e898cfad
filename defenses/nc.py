"""NC, Neural Cleanse (Wang et al., S&P 2019): per class, reverse-engineer the smallest mask m and pattern p
that send clean images to it (x' = (1 - m) x + m p; cross-entropy to the class + cost * |m|_1, the cost moved
by NC's schedule), flag the classes whose mask is an outlier by the anomaly index (MAD, below the median,
index >= 2), then unlearn: fine-tune on the clean subset with a share of each batch stamped with a flagged
class's reversed trigger at the true labels (main_ft.py --defense nc). Where nothing is flagged, NC says so
and leaves the model as it is (0 epochs).

Numbers: config.DEFENSES['nc'] (the reference's, VinAIResearch/input-aware-backdoor-attack-release
defenses/neural_cleanse, and the paper's unlearning).
"""
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

import options as groups
from adversarial import share_count
from batching import Normalizer
from config import INVERSION_IMAGES
from defenses import clean_batches
from defenses.ft_at import fine_tuning_options
from inversion import Search, anomaly_indices, frozen, search
from training import Steps

KEYS = {'nc': dict(label='NC')}
FINDINGS = ('nc_flagged', 'nc_anomaly_index', 'nc_norms')  # the classes flagged, the largest anomaly index, the masks' L1
EPS = 1e-7  # NC's EPSILON: tanh / (2 + eps) + 0.5 stays inside (0, 1)
PROGRESS_S = 60  # seconds between the search's progress lines in a log


def options(add):
    fine_tuning_options(add)
    groups.share(add)  # the share of each batch its reversed triggers are stamped on
    add('--nc_epochs', type=int, minimum=1, help='NC: reverse-engineering passes per class (early stop may end one '
        'sooner)')
    add('--nc_images', type=int, minimum=1, help="NC: clean images per pass (a fresh random draw of the defender's "
        'subset each pass)')
    add('--nc_batch_size', type=int, minimum=1, help='NC: reverse-engineering batch')
    add('--nc_init_cost', type=float, minimum=0, help='NC: initial weight of the mask norm')
    add('--nc_patience', type=int, minimum=1, help='NC: passes above / below the success bound before the cost moves')
    add('--nc_early_stop', type=int, minimum=1, help='NC: stop a class after this many passes without a 1%% smaller '
        'mask, once its cost has moved both ways')
    add('--nc_bound', type=float, minimum=0, help='NC: success a mask must reach to count')
    add('--nc_lr', type=float, minimum=0, help='NC: Adam lr on the mask and pattern')


def to_unit(raw):
    """NC's parametrisation: an unbounded tensor to (0, 1)."""
    return torch.tanh(raw) / (2 + EPS) + 0.5


def apply_trigger(x01, mask, pattern):
    """NC's trigger: (1 - m) x + m p; x (N, C, H, W) in [0,1], mask (1, H, W) or (N, 1, H, W), pattern (C, H, W)."""
    return (1 - mask) * x01 + mask * pattern


class CostSchedule:
    """NC's per-class bookkeeping after each pass: keep the smallest mask that reaches the success bound, move
    the cost (x multiplier after `patience` successful passes, / multiplier**1.5 after `patience` failing ones;
    a cost of 0 is reset once it keeps succeeding), and stop once the cost has moved both ways and the best
    mask has not shrunk by 1% for `early_stop` passes (the reference's early stop)."""

    def __init__(self, init_cost, bound, patience, early_stop, multiplier=2.0):
        self.init_cost, self.cost, self.bound, self.patience, self.early_stop = init_cost, init_cost, bound, patience, \
            early_stop
        self.up_by, self.down_by = multiplier, multiplier ** 1.5
        self.up = self.down = self.zero_count = self.stale = 0
        self.went_up = self.went_down = False
        self.best_norm = self.stop_reference = float('inf')
        self.best = None

    def after_pass(self, success, norm, mask, pattern):
        """Record one pass (its mean success and mask norm, the mask and pattern now); True when done."""
        if success >= self.bound and norm < self.best_norm:
            self.best, self.best_norm = (mask.detach().clone(), pattern.detach().clone()), norm
        if self.best_norm < float('inf'):
            self.stale = self.stale + 1 if self.best_norm >= 0.99 * self.stop_reference else 0
        self.stop_reference = min(self.stop_reference, self.best_norm)
        if self.went_up and self.went_down and self.stale >= self.early_stop:
            return True
        if self.cost == 0 and success >= self.bound:
            self.zero_count += 1
            if self.zero_count >= self.patience:
                self.cost, self.up, self.down, self.went_up, self.went_down = self.init_cost, 0, 0, False, False
        else:
            self.zero_count = 0
        self.up, self.down = (self.up + 1, 0) if success >= self.bound else (0, self.down + 1)
        if self.up >= self.patience:
            self.up, self.cost, self.went_up = 0, self.cost * self.up_by, True
        elif self.down >= self.patience:
            self.down, self.cost, self.went_down = 0, self.cost / self.down_by, True
        return False


@dataclass
class Reversal:
    """NC's reverse-engineering numbers (config.DEFENSES['nc'], through its options)."""
    epochs: int                # passes per class (its early stop may end one sooner)
    images: int                # clean images per pass, a fresh seeded draw
    batch_size: int
    init_cost: float           # initial weight of the mask norm
    bound: float               # success a mask must reach to count
    patience: int              # passes above / below the bound before the cost moves
    early_stop: int            # passes without a 1% smaller mask before a class stops
    lr: float                  # Adam's
    seed: int = 0
    amp: object = False


def reverse_engineer(model, x, normalizer, num_classes, nc, max_images=INVERSION_IMAGES):
    """NC's reverse engineering of every class at once (the numbers of nc, a Reversal), on the one search loop MCL's
    inversion runs too
    (inversion.search: each batch stacked once per class, class k's copy carrying mask k and pattern k; each class
    has its own mask, pattern, cost and counters, the model frozen in eval mode). x: clean uint8 images (N, H, W, C).
    Returns [(mask (1, H, W), pattern (3, H, W), info)] per class: the best mask that reached the bound, else the
    last one (as the reference); info = dict(l1, passes, found)."""
    device, k, (h, w) = x.device, num_classes, x.shape[1:3]
    mask_raw = torch.ones(k, 1, h, w, device=device, requires_grad=True)      # the reference's init: tanh(1)
    pattern_raw = torch.ones(k, 3, h, w, device=device, requires_grad=True)
    schedules = [CostSchedule(nc.init_cost, nc.bound, nc.patience, nc.early_stop) for _ in range(k)]
    live, passes, last = [True] * k, [0] * k, {}

    def stamp(xb, c0, c1):
        masks, patterns = to_unit(mask_raw[c0:c1]), to_unit(pattern_raw[c0:c1])
        return apply_trigger(xb[None], masks[:, None], patterns[:, None]).flatten(0, 1), masks.abs().sum((1, 2, 3))

    def class_line(c, why):
        s = schedules[c]
        mask = s.best[0] if s.best is not None else last['masks'][c]
        print(f"NC class {c}: mask L1 {float(mask.abs().sum()):.2f}, {'reached' if s.best is not None else 'missed'} "
              f'the bound, {passes[c]} passes ({why})', flush=True)

    def after_pass(epoch, success, norm):
        with torch.no_grad():
            last['masks'], last['patterns'] = to_unit(mask_raw), to_unit(pattern_raw)
        for c in range(k):
            if live[c]:
                passes[c] = epoch
                live[c] = not schedules[c].after_pass(success[c], norm[c], last['masks'][c], last['patterns'][c])
                if not live[c] or epoch == nc.epochs:  # a line per class as its search ends
                    class_line(c, 'early stop' if not live[c] else 'last pass')
        if time.time() - clock[0] >= PROGRESS_S and any(live):  # a log has no bar: a line every minute or so
            clock[0] = time.time()
            print(f'NC pass {epoch}/{nc.epochs}: {sum(live)} of {k} classes still searching', flush=True)
        return not any(live)
    clock = [time.time()]
    with frozen(model):
        search(model, x, normalizer, Search(list(range(k)), [mask_raw, pattern_raw], stamp,
                                            lambda: [s.cost for s in schedules], lambda: live, after_pass,
                                            nc.seed * 7919 + 17, nc.images, f'NC: reverse-engineering {k} classes'),
               nc.epochs, nc.batch_size, nc.lr, nc.amp, max_images)
    results = []
    for c, s in enumerate(schedules):
        mask, pattern = s.best if s.best is not None else (last['masks'][c].detach(), last['patterns'][c].detach())
        results.append((mask, pattern, dict(l1=float(mask.abs().sum()), passes=passes[c], found=s.best is not None)))
    return results


def flagged_classes(norms, threshold=2.0):
    """NC's outlier rule: the classes whose mask norm lies below the median with anomaly index >= threshold,
    most anomalous first. Returns (flagged, indices)."""
    idx, median = anomaly_indices(norms), float(np.median(norms))
    flagged = [c for c in range(len(norms)) if norms[c] < median and idx[c] >= threshold]
    return sorted(flagged, key=lambda c: -idx[c]), idx


def with_trigger_share(x01, triggers, share):
    """The batch with its first `share` (at least one image) stamped with the flagged classes' reversed
    triggers, in turn (image i gets trigger i mod len(triggers)); labels kept."""
    n = share_count(share, len(x01))
    if n == 0 or not triggers:
        return x01
    x01 = x01.clone()
    for j, (mask, pattern) in enumerate(triggers):
        x01[j:n:len(triggers)] = apply_trigger(x01[j:n:len(triggers)], mask, pattern)
    return x01


def build(ctx):
    args, run = ctx.args, ctx
    model, norm = run.model, run.data.normalizer.normalize_float
    found = reverse_engineer(model, run.x, run.data.normalizer, run.data.num_classes,
                             Reversal(args.nc_epochs, args.nc_images, args.nc_batch_size, args.nc_init_cost,
                                      args.nc_bound, args.nc_patience, args.nc_early_stop, args.nc_lr, args.seed, args.amp))
    norms = [info['l1'] for _, _, info in found]
    flagged, idx = flagged_classes(norms)
    print('NC anomaly index per class: ' + ' '.join(f'{c}:{v:.2f}' for c, v in enumerate(idx)))
    meta = dict(nc_flagged=flagged, nc_anomaly_index=round(float(max(idx)), 2),
                nc_norms=[round(n, 2) for n in norms])
    if not flagged:
        print('NC: no class flagged (no anomaly index >= 2 below the median): the model is left as it is', flush=True)
        return Steps(batches=lambda epoch: iter(()), loss=None, meta=meta, epochs=0)
    print(f"NC: flagged {', '.join(f'class {c} (index {idx[c]:.2f})' for c in flagged)}; unlearning with "
          f'their reversed triggers on {args.adv_share:g} of each batch at the true labels', flush=True)
    triggers = [found[c][:2] for c in flagged]
    batches = clean_batches(args, run, Normalizer('none', run.device))
    return Steps(batches=lambda epoch: ((with_trigger_share(x01, triggers, args.adv_share), y)
                                        for x01, y in batches(epoch)),
                 loss=lambda x01, y: F.cross_entropy(model(norm(x01)), y), meta=meta)
