"""STRIP (Gao et al., ACSAC 2019; garrisongys/STRIP): a run-time input filter, not an eraser. Each input is
superimposed with N clean images of the defender's subset (the reference's cv2.addWeighted(x, 1, overlay, 1, 0):
the two [0,1] images added, unclipped); a triggered input keeps its (target) prediction whatever it is mixed
with, so the entropy of its N predictions stays low. Inputs whose mean entropy falls below a threshold are
rejected; the threshold is the FRR-quantile (1%) of the normal distribution fitted to the defender's own
clean images' entropies, as the paper sets it (main_strip.py).
"""
import statistics

import torch

from data_loader import seeded
from device import autocast


def superimpose(x01, overlays):
    """Each image of x01 (B, C, H, W) added to its N overlays (B, N, C, H, W): (B * N, C, H, W), unclipped."""
    return (x01[:, None] + overlays).flatten(0, 1)


def entropy_bits(logits):
    """Shannon entropy (bits) of each row's softmax."""
    logp = logits.float().log_softmax(1)
    return -(logp.exp() * logp).sum(1) / torch.log(torch.tensor(2.0))


@torch.no_grad()
def strip_entropy(model, x, pool, normalizer, n, seed, stream, batch_size=16, amp=False):
    """STRIP's score of each uint8 image of x (M, H, W, C): the mean entropy (bits) of the model's predictions
    on the image superimposed with n overlays drawn (seeded, per image) from the uint8 pool, in eval mode."""
    g = seeded(seed, stream)
    picks = torch.randint(len(pool), (len(x), n), generator=g).to(x.device)
    to01 = lambda t: t.permute(0, 3, 1, 2).float() / 255
    out = []
    model.eval()
    for i in range(0, len(x), batch_size):
        xb, idx = to01(x[i:i + batch_size]), picks[i:i + batch_size]
        mixed = superimpose(xb, to01(pool[idx.flatten()]).view(len(xb), n, *xb.shape[1:]))
        with autocast(x.device, amp):
            logits = model(normalizer.normalize_float(mixed))
        out.append(entropy_bits(logits).view(len(xb), n).mean(1))
    return torch.cat(out)


def threshold_at(entropies, frr):
    """The paper's threshold: the frr-quantile of the normal distribution fitted to clean entropies."""
    values = [float(v) for v in entropies]
    return statistics.NormalDist(statistics.fmean(values), statistics.stdev(values)).inv_cdf(frr)


def auroc(clean, triggered):
    """Area under the ROC curve of telling triggered inputs (low entropy) from clean ones: the probability that a
    random triggered input scores below a random clean one (ties count half)."""
    clean, triggered = clean.double(), triggered.double()
    below = (triggered[:, None] < clean[None]).double().mean()
    ties = (triggered[:, None] == clean[None]).double().mean()
    return float(below + ties / 2)
