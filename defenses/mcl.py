"""MCL (Yue et al., ACM MM 2023): with the trigger inverted (inversion.py, main_mcl.py), pull the features
of triggered inputs towards the frozen model's features of the clean ones (model-contrastive loss).

MCL-TK (--defense mcl-tk, not in the paper) keeps the target class: the clean images the model assigns to
the target are left out of the contrastive term, whose push away from the triggered features would push
them away from their own class, and cross-entropy on the clean images anchors every class.
"""
import torch
import torch.nn.functional as F

from config import DEFENSES
from data_loader import Normalizer, train_batches
from device import autocast
from inversion import add_pattern
from metrics import predict
from models import eval_mode
from training import Steps


def options(add):
    add('--temperature', type=float, help='MCL: temperature of the contrastive logits')
    add('--keep_target', action='store_true', help='MCL-TK: leave out of the contrastive term the images the model '
        'assigns to the target, and add cross-entropy on the clean images (keeps the target class)')


def build(args, run, target, pattern):
    """The contrastive steps for the inverted `pattern` of class `target`. A batch's "labels" are its
    images' row numbers in run.x, which index the frozen features."""
    model, recipe = run.model, DEFENSES[args.defense]
    raw = Normalizer('none', run.device)  # batches in [0,1]: the pattern is added before normalising
    norm = run.data.normalizer.normalize_float
    positive, negative = frozen_features(model, run.x, pattern, raw, norm, args.eval_batch_size, args.amp)
    if args.keep_target:  # MCL-TK: see keep_target_loss
        pushed = predict(model, run.x, run.data.normalizer, args.eval_batch_size, args.amp) != target
        print(f'MCL-TK: {int((~pushed).sum())} of {len(pushed)} clean images the model assigns to class {target} '
              'are left out of the contrastive term; cross-entropy on the clean images anchors the rest', flush=True)

    def loss(x01, idx):
        if args.keep_target:
            return keep_target_loss(model, x01, run.y[idx], pattern, norm, positive[idx], negative[idx], pushed[idx],
                                    args.temperature)
        _, _, anchor = model(norm(add_pattern(x01, pattern)), features=True)
        return contrastive_loss(anchor, positive[idx], negative[idx], args.temperature)

    rows = torch.arange(len(run.x), device=run.device)
    batches = lambda epoch: train_batches(run.x, rows, args.batch_size, raw, args.seed, epoch,
                                          augment_data=recipe['augment'], drop_last=recipe['drop_last'])
    return Steps(batches=batches, loss=loss)


def frozen_features(model, x, pattern, to_float, normalize, batch_size=1000, amp=False):
    """Pooled features of the model as it is now, for the uint8 images x and for x + pattern.
    MCL's frozen model sees the same inputs at every epoch (eval mode, no augmentation, a fixed
    pattern), so one pass before erasing replaces a frozen forward of both copies at every step."""
    clean, triggered = [], []
    with eval_mode(model), torch.no_grad(), autocast(x.device, amp):
        for i in range(0, len(x), batch_size):
            x01 = to_float(x[i:i + batch_size])
            clean.append(model(normalize(x01), features=True)[2].float())
            triggered.append(model(normalize(add_pattern(x01, pattern)), features=True)[2].float())
    return torch.cat(clean), torch.cat(triggered)


def contrastive_loss(anchor, positive, negative, temperature=0.5):
    """Cross-entropy with the positive as class 0 over cosine similarities / temperature (fp32)."""
    anchor = anchor.float()
    logits = torch.stack([F.cosine_similarity(anchor, positive, dim=-1),
                          F.cosine_similarity(anchor, negative, dim=-1)], 1) / temperature
    return F.cross_entropy(logits, torch.zeros(len(anchor), dtype=torch.long, device=anchor.device))


def keep_target_loss(model, x01, y, pattern, normalize, positive, negative, pushed, temperature=0.5):
    """MCL-TK: the contrastive loss only on the images in `pushed` (those the original model does not
    assign to the target: for a target-class image, the frozen features of x + pattern are its own
    class's, and pushing away from them pushes the class away), plus cross-entropy on the clean images
    of the batch at their true labels. One forward of both halves (BatchNorm sees the mixture)."""
    n = len(y)
    logits, _, feats = model(normalize(torch.cat([add_pattern(x01, pattern), x01])), features=True)
    ce = F.cross_entropy(logits[n:], y)
    if not bool(pushed.any()):
        return ce
    return contrastive_loss(feats[:n][pushed], positive[pushed], negative[pushed], temperature) + ce
