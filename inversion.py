"""Trigger inversion (MCL's PixelBackdoor-style reverse engineering): per class, the small additive pattern
that sends clean images to it; Neural Cleanse's target detection over the patterns' sizes; the synthesised
trigger a blind defender stamps (FT-SI, PAM-SI, ARGD-SI); and a picture of a pattern.
"""
import contextlib
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from config import INVERSION_BATCH, INVERSION_IMAGES
from device import autocast

EPS = 1e-7
COST_PATIENCE = 10           # passes above/below the success bound before the cost moves
COST_UP, COST_DOWN = 1.5, 1.5 ** 1.5


def size_penalty(param):
    """Soft count of perturbed pixels: per pixel, max over channels of tanh(p/10)/(2-eps)+0.5."""
    return size_penalties(param[None])[0]


def size_penalties(params):
    """size_penalty of each of a stack of patterns (K, C, H, W) -> (K,)."""
    return (torch.tanh(params / 10) / (2 - EPS) + 0.5).amax(1).sum((1, 2))


def add_pattern(x01, pattern):
    """Images in [0,1] (N, C, H, W) + an additive pattern in [0,1]-pixel units, clamped to [0,1]."""
    return (x01 + pattern).clamp(0, 1)


def pattern_pixels(pattern):
    """How many pixel positions a (C, H, W) pattern touches in any channel."""
    return int((pattern.abs().sum(0) > 0).sum())


def stamp(x_uint8, pattern, normalizer):
    """Clean uint8 NHWC images + an additive pattern, normalised for the model."""
    return normalizer.normalize_float(add_pattern(x_uint8.permute(0, 3, 1, 2).float() / 255, pattern))


@torch.no_grad()
def pattern_success(model, x, pattern, target, normalizer, batch_size=256, amp=False):
    """Share of the images x that x + pattern sends to `target` (model in eval mode)."""
    hits = 0
    for i in range(0, len(x), batch_size):
        with autocast(x.device, amp):
            hits += int((model(stamp(x[i:i + batch_size], pattern, normalizer)).argmax(1) == target).sum())
    return hits / max(len(x), 1)


@dataclass
class Search:
    """One trigger search: what the engine (search) needs of a method, MCL's additive patterns or NC's masks.
    A class's copy of each batch is stamped with its own trigger; its loss is the cross-entropy to its class
    plus its cost times its trigger's size; after each pass the method reads each class's mean success and size,
    moves its costs, keeps its best triggers and retires classes."""
    targets: list              # the classes searched, one trigger each
    params: list               # the tensors Adam optimises (every class's trigger stacked along dim 0)
    stamp: Callable            # (xb (B, C, H, W) in [0,1], c0, c1) -> (the batch stamped for classes c0..c1-1 as
    #                            (classes * B, C, H, W), their triggers' sizes (classes,))
    costs: Callable            # () -> each class's size cost for the pass
    live: Callable             # () -> 1 for a class still searched, 0 for a retired one
    after_pass: Callable       # (pass (from 1), success per class, mean size per class) -> True when all are done
    order_seed: int            # the batch order's generator (shared by all classes)
    images: int                # images per pass: a fresh seeded draw of x each pass (all of x: its order)
    desc: str                  # the progress bar's


@contextlib.contextmanager
def frozen(model):
    """The model in eval mode with no weight gradients inside the block (BatchNorm's statistics and the
    weights stay as they are), as it was after."""
    requires, was_training = [p.requires_grad for p in model.parameters()], model.training
    model.eval().requires_grad_(False)
    try:
        yield model
    finally:
        for p, r in zip(model.parameters(), requires):
            p.requires_grad_(r)
        model.train(was_training)


def class_losses(logits, targets, sizes, costs):
    """Each class's objective in a stacked batch: the mean cross-entropy of its block of stamped images to its
    class + its cost times its trigger's size. logits (K * B, classes) in blocks of B images per class, targets
    (K * B,), sizes and costs (K,) -> (K,)."""
    ce = F.cross_entropy(logits, targets, reduction='none').view(len(sizes), -1).mean(1)
    return ce + costs * sizes


def search(model, x, normalizer, s, passes, batch_size, lr, amp=False, max_images=INVERSION_IMAGES):
    """The one loop of trigger inversion, MCL's and NC's: `passes` passes over s.images seeded-shuffled clean uint8
    images x (N, H, W, C) in batches of batch_size (ragged tail dropped), one Adam step (betas 0.5, 0.9, as both
    references) per batch over every class at once: each batch is stacked once per class, so one forward serves
    them all (or, where classes x batch exceeds max_images, one forward per chunk of classes, gradients summed
    before the one step: the same result, less memory for 43 or 100 classes). Each class has its own trigger,
    cost and counters, and Adam's update is per element, so a class gets what it would alone. A class whose search
    has ended (s.live() 0) leaves the forwards: the passes cost what the classes still searching cost (its success
    and size are reported as NaN). The model must be frozen (see frozen)."""
    device, k = x.device, len(s.targets)
    opt = torch.optim.Adam(s.params, lr=lr, betas=(0.5, 0.9))
    order_g = torch.Generator().manual_seed(s.order_seed)
    images, batch_size = min(s.images, len(x)), min(batch_size, len(x))
    labels = torch.tensor(s.targets, device=device).repeat_interleave(batch_size)
    per_forward = max(1, max_images // batch_size)  # classes per forward
    for done in tqdm(range(1, passes + 1), desc=s.desc, unit='pass', disable=None, leave=False):
        order = torch.randperm(len(x), generator=order_g)[:images].to(device)
        hits, sizes, steps = torch.zeros(k, device=device), torch.zeros(k, device=device), 0
        # built once per pass (costs and retirements move only between passes): no host copy per step
        cost = torch.tensor(s.costs(), device=device)
        on = s.live()
        live = torch.tensor(on, dtype=torch.float32, device=device)
        chunks = live_chunks(on, per_forward)  # a retired class is left out of the forward (its gradient is 0)
        for i in range(0, images - batch_size + 1, batch_size):
            xb = x[order[i:i + batch_size]].permute(0, 3, 1, 2).float() / 255
            opt.zero_grad(set_to_none=True)
            for c0, c1 in chunks:
                stamped, size = s.stamp(xb, c0, c1)
                with autocast(device, amp):
                    out = model(normalizer.normalize_float(stamped)).float()
                wanted = labels[c0 * batch_size:c1 * batch_size]
                (class_losses(out, wanted, size, cost[c0:c1]) * live[c0:c1]).sum().backward()
                hits[c0:c1] += (out.argmax(1) == wanted).float().view(-1, batch_size).mean(1).detach()
                sizes[c0:c1] += size.detach()
            opt.step()
            steps += 1
        retired = live == 0  # not scored this pass
        if s.after_pass(done, (hits / steps).masked_fill(retired, float('nan')).tolist(),
                        (sizes / steps).masked_fill(retired, float('nan')).tolist()):
            break


def live_chunks(on, per_forward):
    """The searching classes (on[c] != 0) as contiguous ranges (c0, c1) of at most per_forward classes each: the
    forwards of one step. With every class searching: (0, p), (p, 2p), ..."""
    chunks, c = [], 0
    while c < len(on):
        if not on[c]:
            c += 1
            continue
        end = c
        while end < len(on) and on[end] and end - c < per_forward:
            end += 1
        chunks.append((c, end))
        c = end
    return chunks


@dataclass
class Budget:
    """A pattern inversion's numbers (MCL's, and its target detection's: --detect_epochs passes)."""
    passes: int = 100          # shuffled passes over the images, one Adam step per batch
    batch_size: int = 64
    patience: int = 0          # retire a class after this many passes without a smaller pattern (0: never)
    asr_bound: float = 0.9     # success a pattern must reach to count
    init_cost: float = 1e-3    # initial weight of the size penalty
    lr: float = 0.1            # Adam's
    seed: int = 0
    amp: object = False        # autocast (device.autocast's)


def invert_triggers(model, x, targets, normalizer, budget, report=None, max_images=INVERSION_IMAGES):
    """For each class in `targets`, find a small additive pattern (3, H, W), values in [-1, 1] in
    [0,1]-pixel units, that sends the clean uint8 images x (N, H, W, C) to that class, all classes at once
    (search), with the numbers of `budget` (a Budget). Counted as the reference (PixelBackdoor.generate) counts it: `passes` shuffled passes over x,
    one Adam step per batch; after each pass, the pass's mean success and size penalty decide whether a
    pattern is the best so far and whether its cost moves. patience > 0 retires a class after that many
    passes without a smaller pattern. As the reference, a class whose pattern never reached asr_bound gets
    an all-zero pattern. Returns [(pattern, info)] in the order of targets: info = dict(l1, pixels, asr
    (success on all of x), passes, found, last_l1 (of the last pass's pattern, which detection ranks a miss by)).
    """
    b, device, k = budget, x.device, len(targets)
    passes, patience, asr_bound, init_cost, seed, amp = b.passes, b.patience, b.asr_bound, b.init_cost, b.seed, b.amp
    shape = (3, x.shape[1], x.shape[2])
    inits = [torch.Generator().manual_seed(seed * 7919 + t) for t in targets]  # a class's start: its own
    pos = torch.stack([torch.rand(shape, generator=g) for g in inits]).to(device).requires_grad_(True)
    neg = torch.stack([torch.rand(shape, generator=g) for g in inits]).to(device).requires_grad_(True)
    state = dict(cost=[init_cost] * k, up=[0] * k, down=[0] * k, since_best=[0] * k, best=[None] * k,
                 best_reg=[float('inf')] * k, best_pixels=[float('inf')] * k, active=list(range(k)),
                 passes=[0] * k, current=None, pos=pos, neg=neg, asr_bound=asr_bound, init_cost=init_cost,
                 patience=patience)

    def stamp(xb, c0, c1):
        patterns = pos[c0:c1].clamp(0, 1) - neg[c0:c1].clamp(0, 1)
        return (add_pattern(xb[None], patterns[:, None]).flatten(0, 1),  # (classes * B, C, H, W)
                size_penalties(pos[c0:c1]) + size_penalties(neg[c0:c1]))

    def after_pass(done, asr, reg):
        with torch.no_grad():
            current = pos.clamp(0, 1) - neg.clamp(0, 1)
            current = state['current'] = torch.where(current.abs() < 1.0 / 255, torch.zeros_like(current), current)
            for c in list(state['active']):
                pattern_step(state, c, done, current, asr[c], reg[c])
        if report and done % 10 == 0:
            report(f'inversion pass {done}/{passes}: ' + ', '.join(
                f"class {t} success {100 * asr[c]:.1f}% best "
                f"{state['best_pixels'][c] if state['best'][c] is not None else '-'} px" for c, t in enumerate(targets)))
        return not state['active']

    def live():
        on = [0.0] * k
        for c in state['active']:
            on[c] = 1.0  # a retired class weighs 0
        return on
    with frozen(model):
        search(model, x, normalizer, Search(list(targets), [pos, neg], stamp, lambda: state['cost'], live, after_pass,
                                            seed * 7919 - 1, len(x), f'inverting {k} classes'),
               passes, b.batch_size, b.lr, amp, max_images)
        results = []
        for c, t in enumerate(targets):
            best = state['best'][c]
            pattern = best if best is not None else torch.zeros(shape, device=device)
            success = pattern_success(model, x, pattern, t, normalizer, amp=amp)
            results.append((pattern, dict(l1=float(pattern.abs().sum()), pixels=pattern_pixels(pattern), asr=success,
                                          passes=state['passes'][c], found=best is not None,
                                          last_l1=float(state['current'][c].abs().sum()))))
    return results


def pattern_step(state, c, done, current, asr, reg):
    """MCL's bookkeeping of class c after a pass (PixelBackdoor's): keep the pattern as the best where it reached
    the bound and is smaller, restarting the search from it; move the cost after COST_PATIENCE passes above or
    below the bound; retire the class after `patience` passes without a smaller pattern (0: never). state: the
    search's (invert_triggers), with its patterns' positive and negative parts and its numbers."""
    pos, neg, asr_bound, patience = state['pos'], state['neg'], state['asr_bound'], state['patience']
    state['passes'][c] = done
    pixels = pattern_pixels(current[c])
    if asr >= asr_bound and reg < state['best_reg'][c] and pixels < state['best_pixels'][c]:
        state['best'][c], state['best_reg'][c], state['best_pixels'][c] = current[c].clone(), reg, pixels
        state['since_best'][c] = 0
        pos[c].copy_(current[c].clamp(min=0))  # restart from the thresholded best, as the reference
        neg[c].copy_((-current[c]).clamp(min=0))
    else:
        state['since_best'][c] += 1
    up, down, cost = state['up'], state['down'], state['cost']
    up[c], down[c] = (up[c] + 1, 0) if asr >= asr_bound else (0, down[c] + 1)
    if up[c] >= COST_PATIENCE:
        up[c], cost[c] = 0, cost[c] * COST_UP if cost[c] > 0 else state['init_cost']
    elif down[c] >= COST_PATIENCE:
        down[c], cost[c] = 0, cost[c] / COST_DOWN
    if patience and state['best'][c] is not None and state['since_best'][c] >= patience:
        state['active'].remove(c)


def anomaly_indices(norms):
    """Neural Cleanse's anomaly index per class: |norm - median| / (1.4826 * MAD)."""
    norms = np.asarray(norms, dtype=np.float64)
    median = np.median(norms)
    mad = 1.4826 * np.median(np.abs(norms - median))
    return np.abs(norms - median) / max(mad, 1e-12)


def detect_target(norms, threshold=2.0):
    """The class with the smallest pattern, if it is an outlier (index >= threshold) below the median.
    Returns (label or None, its anomaly index, all indices)."""
    idx = anomaly_indices(norms)
    smallest = int(np.argmin(norms))
    flagged = idx[smallest] >= threshold and norms[smallest] < np.median(norms)
    return (smallest if flagged else None), float(idx[smallest]), idx


def find_target(model, x, normalizer, num_classes, budget):
    """Invert a pattern for every class at once with a short budget (a line per class). Returns (detected
    label or None, its anomaly index, max anomaly index, smallest-pattern class, [(pattern, info)] per class)."""
    patterns = invert_triggers(model, x, list(range(num_classes)), normalizer, budget)
    for c, (_, info) in enumerate(patterns):
        print(f"class {c}: pattern L1 {info['l1']:.2f}, {info['pixels']} pixels, success {100 * info['asr']:.1f}%, "
              f"{'reached' if info['found'] else 'missed'} the bound in {info['passes']} passes", flush=True)
    norms = [info['l1'] if info['found'] else info['last_l1'] for _, info in patterns]
    label, index, indices = detect_target(norms)
    print('anomaly index per class: ' + ' '.join(f'{c}:{v:.2f}' for c, v in enumerate(indices)))
    return label, index, float(max(indices)), min(range(len(norms)), key=norms.__getitem__), patterns


def synthesised_trigger(run, args):
    """A blind defender's stand-in for the trigger: MCL's target detection on the defender's clean subset
    (every class, the detection options: --detect_epochs, ...) and the pattern of the class it flags, or of the smallest
    pattern's class when none stands out (the defender cannot tell; a small pattern stamped at true
    labels costs little). run: defenses.defense_setup's. Returns (pattern, what it is: a dict for the meta)."""
    budget = Budget(args.detect_epochs, INVERSION_BATCH, args.inv_patience, args.asr_bound, args.init_cost,
                    seed=args.seed, amp=args.amp)
    label, index, _, smallest, patterns = find_target(run.model, run.x, run.data.normalizer, run.data.num_classes, budget)
    chosen = smallest if label is None else label
    pattern, info = patterns[chosen]
    why = 'no class detected: the smallest pattern' if label is None else f'detected, anomaly index {index:.2f}'
    print(f"synthesised trigger: class {chosen}'s inverted pattern ({why}; {info['pixels']} pixels, "
          f"L1 {info['l1']:.2f})", flush=True)
    return pattern, dict(synthesised_class=chosen, detected=label is not None, anomaly_index=round(index, 2),
                         pixels=info['pixels'])


def trigger_picture(pattern, clean_image, real_triggered=None, scale=4):
    """PIL image: positive part, negative part, clean image + inverted pattern[, real triggered image].
    pattern (3, H, W) in [-1, 1]; images uint8 (H, W, 3)."""
    from PIL import Image
    pos = (pattern.clamp(min=0) * 255).permute(1, 2, 0)
    neg = (-pattern.clamp(max=0) * 255).permute(1, 2, 0)
    stamped = (clean_image.float() + pattern.permute(1, 2, 0) * 255).clamp(0, 255)
    panels = [pos, neg, stamped] + ([real_triggered.float()] if real_triggered is not None else [])
    h, w = clean_image.shape[:2]
    gap = 4
    canvas = np.full((h * scale, len(panels) * (w * scale + gap) - gap, 3), 255, dtype=np.uint8)
    for i, p in enumerate(panels):
        big = p.round().to(torch.uint8).cpu().numpy().repeat(scale, 0).repeat(scale, 1)
        canvas[:, i * (w * scale + gap):i * (w * scale + gap) + w * scale] = big
    return Image.fromarray(canvas)
