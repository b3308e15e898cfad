"""Trigger inversion (MCL's PixelBackdoor-style reverse engineering): per class, the small additive pattern
that sends clean images to it; Neural Cleanse's target detection over the patterns' sizes; the synthesised
trigger a blind defender stamps (FT-SI, PAM-SI, ARGD-SI); and a picture of a pattern.
"""
import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from config import INVERSION, INVERSION_BATCH, INVERSION_IMAGES
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


def invert_triggers(model, x, targets, normalizer, passes=100, batch_size=64, patience=0, asr_bound=0.9,
                    init_cost=1e-3, lr=0.1, seed=0, amp=False, report=None, max_images=INVERSION_IMAGES):
    """For each class in `targets`, find a small additive pattern (3, H, W), values in [-1, 1] in
    [0,1]-pixel units, that sends the clean uint8 images x (N, H, W, C) to that class.

    All classes are inverted together: each batch is stacked once per class (class k's copy carries
    pattern k), so one forward serves them all (or, where classes x batch exceeds max_images, one
    forward per chunk of classes, gradients summed before the one step: the same result, less memory
    for 43 or 100 classes); each class has its own pattern, size cost and
    success counters, and Adam's update is per element, so a class's pattern is the one it would get
    alone (BatchNorm is in eval mode and the model's parameters are frozen: no weight gradients).
    Counted as the reference (PixelBackdoor.generate) counts it: `passes` shuffled passes over x in
    batches of `batch_size` (ragged tail dropped), one Adam step per batch; after each pass, the
    pass's mean success and size penalty decide whether a pattern is the best so far and whether its
    cost moves. patience > 0 retires a class after that many passes without a smaller pattern.
    As the reference, a class whose pattern never reached asr_bound gets an all-zero pattern.
    Returns [(pattern, info)] in the order of targets: info = dict(l1, pixels, asr (success on all
    of x), passes, found, last_l1 (of the last pass's pattern, which detection ranks a miss by)).
    """
    device, k = x.device, len(targets)
    shape = (3, x.shape[1], x.shape[2])
    inits = [torch.Generator().manual_seed(seed * 7919 + t) for t in targets]  # a class's start: its own
    pos = torch.stack([torch.rand(shape, generator=g) for g in inits]).to(device).requires_grad_(True)
    neg = torch.stack([torch.rand(shape, generator=g) for g in inits]).to(device).requires_grad_(True)
    order_g = torch.Generator().manual_seed(seed * 7919 - 1)  # the batch order: shared by all classes
    opt = torch.optim.Adam([pos, neg], lr=lr, betas=(0.5, 0.9))
    requires = [p.requires_grad for p in model.parameters()]
    was_training = model.training
    model.eval().requires_grad_(False)
    batch_size = min(batch_size, len(x))
    labels = torch.tensor(targets, device=device).repeat_interleave(batch_size)
    cost, up, down, since_best = [init_cost] * k, [0] * k, [0] * k, [0] * k
    best, best_reg, best_pixels = [None] * k, [float('inf')] * k, [float('inf')] * k
    active, passes_done = list(range(k)), [0] * k
    per_forward = max(1, max_images // batch_size)  # classes per forward
    chunks = [(c, min(c + per_forward, k)) for c in range(0, k, per_forward)]
    bar = tqdm(range(1, passes + 1), desc=f'inverting {k} classes', unit='pass', disable=None, leave=False)
    for done in bar:
        order = torch.randperm(len(x), generator=order_g).to(device)
        hits, regs, steps = torch.zeros(k, device=device), torch.zeros(k, device=device), 0
        # built once per pass (the costs and retirements move only between passes): no host copy per step
        cost_t = torch.tensor(cost, device=device)
        live = torch.zeros(k, device=device)
        live[active] = 1.0  # a retired class weighs 0
        for i in range(0, len(x) - batch_size + 1, batch_size):
            xb = x[order[i:i + batch_size]].permute(0, 3, 1, 2).float() / 255
            opt.zero_grad(set_to_none=True)
            for c0, c1 in chunks:
                patterns = pos[c0:c1].clamp(0, 1) - neg[c0:c1].clamp(0, 1)
                stacked = add_pattern(xb[None], patterns[:, None]).flatten(0, 1)  # (classes * B, C, H, W)
                with autocast(device, amp):
                    out = model(normalizer.normalize_float(stacked)).float()
                wanted = labels[c0 * batch_size:c1 * batch_size]
                reg = size_penalties(pos[c0:c1]) + size_penalties(neg[c0:c1])      # (classes,)
                ce = F.cross_entropy(out, wanted, reduction='none').view(-1, batch_size).mean(1)
                ((ce + cost_t[c0:c1] * reg) * live[c0:c1]).sum().backward()
                hits[c0:c1] += (out.argmax(1) == wanted).float().view(-1, batch_size).mean(1).detach()
                regs[c0:c1] += reg.detach()
            opt.step()
            steps += 1
        asr, reg = (hits / steps).tolist(), (regs / steps).tolist()
        with torch.no_grad():
            current = pos.clamp(0, 1) - neg.clamp(0, 1)
            current = torch.where(current.abs() < 1.0 / 255, torch.zeros_like(current), current)
            for c in list(active):
                passes_done[c] = done
                pixels = pattern_pixels(current[c])
                if asr[c] >= asr_bound and reg[c] < best_reg[c] and pixels < best_pixels[c]:
                    best[c], best_reg[c], best_pixels[c], since_best[c] = current[c].clone(), reg[c], pixels, 0
                    pos[c].copy_(current[c].clamp(min=0))  # restart from the thresholded best, as the reference
                    neg[c].copy_((-current[c]).clamp(min=0))
                else:
                    since_best[c] += 1
                up[c], down[c] = (up[c] + 1, 0) if asr[c] >= asr_bound else (0, down[c] + 1)
                if up[c] >= COST_PATIENCE:
                    up[c], cost[c] = 0, cost[c] * COST_UP if cost[c] > 0 else init_cost
                elif down[c] >= COST_PATIENCE:
                    down[c], cost[c] = 0, cost[c] / COST_DOWN
                if patience and best[c] is not None and since_best[c] >= patience:
                    active.remove(c)
        if report and done % 10 == 0:
            report(f'inversion pass {done}/{passes}: ' + ', '.join(
                f"class {t} success {100 * asr[c]:.1f}% best {best_pixels[c] if best[c] is not None else '-'} px"
                for c, t in enumerate(targets)))
        if not active:
            break
    results = []
    for c, t in enumerate(targets):
        pattern = best[c] if best[c] is not None else torch.zeros(shape, device=device)
        success = pattern_success(model, x, pattern, t, normalizer, amp=amp)
        results.append((pattern, dict(l1=float(pattern.abs().sum()), pixels=pattern_pixels(pattern), asr=success,
                                      passes=passes_done[c], found=best[c] is not None,
                                      last_l1=float(current[c].abs().sum()))))
    for p, r in zip(model.parameters(), requires):
        p.requires_grad_(r)
    model.train(was_training)
    return results


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


def find_target(model, x, normalizer, num_classes, passes, batch_size, patience, asr_bound, init_cost, seed, amp):
    """Invert a pattern for every class at once with a short budget (a line per class). Returns (detected
    label or None, its anomaly index, max anomaly index, smallest-pattern class, [(pattern, info)] per class)."""
    patterns = invert_triggers(model, x, list(range(num_classes)), normalizer, passes, batch_size, patience, asr_bound,
                               init_cost, seed=seed, amp=amp)
    for c, (_, info) in enumerate(patterns):
        print(f"class {c}: pattern L1 {info['l1']:.2f}, {info['pixels']} pixels, success {100 * info['asr']:.1f}%, "
              f"{'reached' if info['found'] else 'missed'} the bound in {info['passes']} passes", flush=True)
    norms = [info['l1'] if info['found'] else info['last_l1'] for _, info in patterns]
    label, index, indices = detect_target(norms)
    print('anomaly index per class: ' + ' '.join(f'{c}:{v:.2f}' for c, v in enumerate(indices)))
    return label, index, float(max(indices)), min(range(len(norms)), key=norms.__getitem__), patterns


def synthesised_trigger(run, seed, amp):
    """A blind defender's stand-in for the trigger: MCL's target detection on the defender's clean subset
    (every class, config.INVERSION's budget) and the pattern of the class it flags, or of the smallest
    pattern's class when none stands out (the defender cannot tell; a small pattern stamped at true
    labels costs little). run: defenses.defense_setup's. Returns (pattern, what it is: a dict for the meta)."""
    m = INVERSION
    label, index, _, smallest, patterns = find_target(run.model, run.x, run.data.normalizer, run.data.num_classes,
                                                      m['detect_epochs'], INVERSION_BATCH, m['inv_patience'],
                                                      m['asr_bound'], m['init_cost'], seed, amp)
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
