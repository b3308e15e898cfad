"""STRIP (Gao et al., ACSAC 2019; garrisongys/STRIP): a run-time input filter, not an eraser. Each input is
superimposed with N clean images of the defender's subset (the reference's cv2.addWeighted(x, 1, overlay, 1, 0):
the two [0,1] images added, unclipped); a triggered input keeps its (target) prediction whatever it is mixed
with, so the entropy of its N predictions stays low. Inputs whose mean entropy falls below a threshold are
rejected; the threshold is the FRR-quantile (1%) of the entropies of a seeded random strip_images of the
defender's own clean images: their empirical quantile (strip_threshold 'quantile'), or, as the paper sets it,
that of the normal distribution fitted to them ('normal'), whose left tail is lighter than theirs (on the zoo's
BadNets model it rejects 2.4% of the very images it was fitted to; results/README.md, STRIP). main_strip.py,
main_ft.py --defense strip. Registered as a filter: it leaves the model as it is and is not a column of the
erasers' table (results/README.md has its own).
"""
import statistics
import time

import torch

import options as groups
from config import STRIP_BATCH
from device import autocast
from errors import UserError
from metrics import predict, summary_line
from subsets import seeded, test_subset

KEYS = {'strip': dict(label='STRIP', filter=True)}  # blind; a run-time filter, the model unchanged
FINDINGS = ('FRR', 'FAR', 'AUROC', 'ASR_through', 'threshold')


def options(add):
    groups.strip(add)


def check(args):
    if not 0 < args.strip_frr < 1:
        raise UserError(f'--strip_frr must be in (0, 1), got {args.strip_frr}')


def build(ctx):
    """Set the threshold on the defender's own clean images, score --strip_images clean and triggered test images,
    print FRR, FAR, AUROC, the model's ASR on them and the ASR that gets through; None: nothing to train or write."""
    args, run = ctx.args, ctx
    model, norm, n = run.model.eval(), run.data.normalizer, args.strip_n
    score = lambda x, stream: strip_entropy(model, x, run.x, norm, n, args.seed, stream, STRIP_BATCH, args.amp)
    # a random sample: the subset keeps the training set's order, by class in an image folder
    pick = torch.randperm(len(run.y), generator=seeded(args.seed, 'strip-sample'))[:args.strip_images]
    own = score(run.x[pick.to(run.x.device)], 'strip-defender')
    threshold = threshold_at(own, args.strip_frr, args.strip_threshold)
    rule = 'the entropies' if args.strip_threshold == 'quantile' else 'the normal fitted to the entropies'
    print(f"threshold {threshold:.4f} bits: the {args.strip_frr:g} quantile of {rule} of {len(own)} of the "
          f"defender's clean images (mean {float(own.mean()):.4f}, std {float(own.std()):.4f})", flush=True)
    test = test_subset(run.data.test, args.strip_images, args.seed)
    t0 = time.time()
    clean, triggered = score(test['x_clean'], 'strip-clean'), score(test['x_bd'], 'strip-triggered')
    accepted = triggered >= threshold
    hits = predict(model, test['x_bd'], norm, args.eval_batch_size, args.amp) == test['y_bd']
    pct = lambda t: round(100.0 * t.float().mean().item(), 2)
    metrics = dict(FRR=pct(clean < threshold), FAR=pct(accepted), AUROC=round(100 * auroc(clean, triggered), 2),
                   ASR=pct(hits), ASR_through=pct(accepted & hits), threshold=round(threshold, 4),
                   images=[len(clean), len(triggered)], n=n, seconds=round(time.time() - run.started, 1))
    print(f"{len(clean)} clean and {len(triggered)} triggered test images, {n} overlays each "
          f"({time.time() - t0:.0f}s): entropy clean {float(clean.mean()):.3f}, triggered {float(triggered.mean()):.3f}")
    print(summary_line(metrics, True) if args.json else
          ' '.join(f'{k} {metrics[k]:.2f}' for k in ('FRR', 'FAR', 'AUROC', 'ASR', 'ASR_through')))


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


def threshold_at(entropies, frr, rule='quantile'):
    """The frr-quantile of clean entropies: their own (rule 'quantile', linear between order statistics), or the
    paper's, of the normal distribution fitted to them ('normal')."""
    if rule == 'quantile':
        return float(torch.quantile(entropies.double().cpu(), frr))
    values = [float(v) for v in entropies]
    return statistics.NormalDist(statistics.fmean(values), statistics.stdev(values)).inv_cdf(frr)


def auroc(clean, triggered):
    """Area under the ROC curve of telling triggered inputs (low entropy) from clean ones: the probability that a
    random triggered input scores below a random clean one (ties count half)."""
    clean, triggered = clean.double(), triggered.double()
    below = (triggered[:, None] < clean[None]).double().mean()
    ties = (triggered[:, None] == clean[None]).double().mean()
    return float(below + ties / 2)
