"""MCL (Yue et al., ACM MM 2023): reverse-engineer the trigger, then pull the features of
triggered inputs towards the frozen model's features of clean ones (model-contrastive loss).

Also: Neural-Cleanse-style target-label detection from per-class inverted patterns, and a
picture of the inverted trigger.
"""
import numpy as np
import torch
import torch.nn.functional as F

from utils import autocast

EPS = 1e-7
COST_PATIENCE = 10           # passes above/below the success bound before the cost moves
COST_UP, COST_DOWN = 1.5, 1.5 ** 1.5


def size_penalty(param):
    """Soft count of perturbed pixels: per pixel, max over channels of tanh(p/10)/(2-eps)+0.5."""
    return (torch.tanh(param / 10) / (2 - EPS) + 0.5).amax(0).sum()


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
def pattern_success(model, x, pattern, target, normalizer, batch_size=256):
    """Share of the images x that x + pattern sends to `target` (model in eval mode)."""
    hits = sum(int((model(stamp(x[i:i + batch_size], pattern, normalizer)).argmax(1) == target).sum())
               for i in range(0, len(x), batch_size))
    return hits / max(len(x), 1)


def invert_trigger(model, x, target, normalizer, passes=100, batch_size=64, patience=0, asr_bound=0.9,
                   init_cost=1e-3, lr=0.1, seed=0, report=None):
    """Find a small additive pattern (3, H, W), values in [-1, 1] in [0,1]-pixel units, that sends
    the clean uint8 images x (N, H, W, C) to `target`.

    Counted as the reference (PixelBackdoor.generate) counts it: `passes` shuffled passes over x in
    batches of `batch_size` (ragged tail dropped, as its loader), one Adam step per batch; after
    each pass, the pass's mean success and size penalty decide whether the pattern is the best
    so far and whether the size cost moves. patience > 0 stops after that many passes without a
    smaller pattern. report(text), if given, hears from it every 10 passes. Returns (pattern, info):
    info = dict(l1, pixels, asr (success of the pattern on all of x), passes, found).
    """
    g = torch.Generator().manual_seed(seed * 7919 + target)
    device = x.device
    shape = (3, x.shape[1], x.shape[2])
    pos = torch.rand(shape, generator=g).to(device).requires_grad_(True)
    neg = torch.rand(shape, generator=g).to(device).requires_grad_(True)
    opt = torch.optim.Adam([pos, neg], lr=lr, betas=(0.5, 0.9))
    threshold = 1.0 / 255
    was_training = model.training
    model.eval()
    requires = [p.requires_grad for p in model.parameters()]
    model.requires_grad_(False)
    batch_size = min(batch_size, len(x))
    labels = torch.full((batch_size,), target, device=device)
    cost, up, down, since_best = init_cost, 0, 0, 0
    best, best_reg, best_pixels = None, float('inf'), float('inf')
    done = 0
    for done in range(1, passes + 1):
        order = torch.randperm(len(x), generator=g).to(device)
        hits, regs = torch.zeros((), device=device), []
        for i in range(0, len(x) - batch_size + 1, batch_size):
            out = model(stamp(x[order[i:i + batch_size]], pos.clamp(0, 1) - neg.clamp(0, 1), normalizer))
            reg = size_penalty(pos) + size_penalty(neg)
            loss = F.cross_entropy(out, labels) + cost * reg
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            hits += (out.argmax(1) == target).float().mean().detach()
            regs.append(reg.detach())
        asr, reg = hits.item() / len(regs), torch.stack(regs).mean().item()
        with torch.no_grad():
            current = pos.clamp(0, 1) - neg.clamp(0, 1)
            current = torch.where(current.abs() < threshold, torch.zeros_like(current), current)
            pixels = pattern_pixels(current)
            if asr >= asr_bound and reg < best_reg and pixels < best_pixels:
                best, best_reg, best_pixels, since_best = current.clone(), reg, pixels, 0
                # restart from the thresholded best, as the reference does
                pos.copy_(current.clamp(min=0))
                neg.copy_((-current).clamp(min=0))
            else:
                since_best += 1
        up, down = (up + 1, 0) if asr >= asr_bound else (0, down + 1)
        if up >= COST_PATIENCE:
            up, cost = 0, cost * COST_UP if cost > 0 else init_cost
        elif down >= COST_PATIENCE:
            down, cost = 0, cost / COST_DOWN
        if report and done % 10 == 0:
            report(f'inversion pass {done}/{passes}: success {100 * asr:.1f}%, best pattern '
                   f'{best_pixels if best is not None else "-"} pixels, cost {cost:.2e}')
        if patience and best is not None and since_best >= patience:
            break
    found = best is not None
    pattern = (best if found else current).detach()
    success = pattern_success(model, x, pattern, target, normalizer)
    for p, r in zip(model.parameters(), requires):
        p.requires_grad_(r)
    model.train(was_training)
    return pattern, dict(l1=float(pattern.abs().sum()), pixels=pattern_pixels(pattern),
                         asr=success, passes=done, found=found)


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


def frozen_features(model, x, pattern, to_float, normalize, batch_size=1000, amp=False):
    """Pooled features of the model as it is now, for the uint8 images x and for x + pattern.
    MCL's frozen model sees the same inputs at every epoch (eval mode, no augmentation, a fixed
    pattern), so one pass before erasing replaces a frozen forward of both copies at every step."""
    was_training = model.training
    model.eval()
    clean, triggered = [], []
    with torch.no_grad(), autocast(x.device, amp):
        for i in range(0, len(x), batch_size):
            x01 = to_float(x[i:i + batch_size])
            clean.append(model(normalize(x01), features=True)[2].float())
            triggered.append(model(normalize(add_pattern(x01, pattern)), features=True)[2].float())
    model.train(was_training)
    return torch.cat(clean), torch.cat(triggered)


def contrastive_loss(anchor, positive, negative, temperature=0.5):
    """Cross-entropy with the positive as class 0 over cosine similarities / temperature (fp32)."""
    anchor = anchor.float()
    logits = torch.stack([F.cosine_similarity(anchor, positive, dim=-1),
                          F.cosine_similarity(anchor, negative, dim=-1)], 1) / temperature
    return F.cross_entropy(logits, torch.zeros(len(anchor), dtype=torch.long, device=anchor.device))


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
