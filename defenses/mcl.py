"""MCL (Yue et al., ACM MM 2023): with the trigger inverted (inversion.py, main_mcl.py), pull the features
of triggered inputs towards the frozen model's features of the clean ones (model-contrastive loss).

MCL-TK (--defense mcl-tk, not in the paper) keeps the target class: the clean images the model assigns to
the target are left out of the contrastive term, whose push away from the triggered features would push
them away from their own class, and cross-entropy on the clean images anchors every class.
"""
import os
import time

import torch
import torch.nn.functional as F

import options as groups
from batching import Normalizer, train_batches
from device import autocast
from errors import UserError
from inversion import Budget, add_pattern, find_target, invert_triggers, trigger_picture
from metrics import evaluate, predict, summary_line
from models import eval_mode
from training import Steps
from triggers import apply_trigger

# told the row's target by the table (--mcl_target); MCL-TK (not in the paper) keeps the target class
KEYS = {'mcl': dict(label='MCL', told='--mcl_target'), 'mcl-tk': dict(label='MCL-TK', told='--mcl_target')}


def tag(args):
    return 'mcl-tk' if args.keep_target else 'mcl'


def extra_files(args, tag, s_name):
    """A picture of the inverted trigger beside the real one."""
    return {'trigger picture': os.path.join(args.log_root, f'{tag}_{s_name}_trigger.png')}


def options(add):
    groups.schedule(add)
    groups.recipe(add)
    groups.inversion(add)
    groups.detection(add)
    add('--temperature', type=float, help='MCL: temperature of the contrastive logits')
    add('--keep_target', action='store_true', help='MCL-TK: leave out of the contrastive term the images the model '
        'assigns to the target, and add cross-entropy on the clean images (keeps the target class)')


def check(args):
    if args.mcl_target != 'auto' and not args.mcl_target.isdigit():
        raise UserError(f"--mcl_target must be 'auto' or a class index >= 0, got '{args.mcl_target}'")


def budget(args, passes):
    """MCL's inversion numbers from its options, `passes` passes (--inv_epochs, or --detect_epochs per class)."""
    return Budget(passes, args.batch_size, args.inv_patience, args.asr_bound, args.init_cost, seed=args.seed,
                  amp=args.amp)


def true_target(args, run):
    """How the evaluation's target is known, for the detection line."""
    label = run.data.attack['target_label']
    if 'target_label' not in args.given and 'target_label' not in run.meta.get('attack', {}):
        return f'true target unknown: no meta, no --target_label; scored against {label} (config.ATTACK)'
    return f'true target {label}'


def told_or_detected(args, run):
    """MCL's target: the one it is told (--mcl_target), else Neural Cleanse's detection (with its patterns); None
    where nothing is detected and it is not forced."""
    if args.mcl_target != 'auto':
        return int(args.mcl_target), None
    target, index, max_index, smallest, detected = find_target(run.model, run.x, run.data.normalizer,
                                                               run.data.num_classes, budget(args, args.detect_epochs))
    if target is not None:
        print(f'detected target label: {target} ({true_target(args, run)}; anomaly index {index:.2f})')
        return target, detected
    print(f'no target label detected (max anomaly index {max_index:.2f})')
    if not args.force or args.epochs == 0:
        print('the model looks clean: left unchanged (--force erases with the smallest-pattern class)')
        return None, detected
    print(f'--force: erasing with class {smallest}, the smallest pattern')
    return smallest, detected


def build(ctx):
    """Invert the trigger of the told or detected target on the clean subset (its picture beside the real one),
    then MCL's contrastive steps; None (the model left unchanged, its scores printed) where no target is
    detected, or with --epochs 0 (detection only)."""
    args, run, data = ctx.args, ctx, ctx.data
    unchanged = lambda: print(summary_line(evaluate(run.model, data.test, data.normalizer, args.eval_batch_size,
                                                    args.amp), args.json))
    target, detected = told_or_detected(args, run)
    if target is None:
        return unchanged()
    if not 0 <= target < data.num_classes:
        raise UserError(f'--mcl_target {target} is outside [0, {data.num_classes})')
    t_inv = time.time()
    if detected and args.epochs == 0:  # detection only: picture the pattern detection found
        pattern, info = detected[target]
    else:  # erasing gets the full inversion budget
        (pattern, info), = invert_triggers(run.model, run.x, [target], run.data.normalizer,
                                           budget(args, args.inv_epochs), report=lambda text: print(text, flush=True))
    if not info['found']:
        print(f'no pattern reached {100 * args.asr_bound:.0f}% success in {info["passes"]} passes: as the reference, '
              'the inverted pattern is all zero: positive and negative features are equal, the contrastive loss has no '
              'gradient, and erasing changes the model only through weight decay')
    print(f"inverted trigger for class {target}: {info['pixels']} pixels, L1 {info['l1']:.2f}, "
          f"success {100 * info['asr']:.1f}% on the clean subset after {info['passes']} passes "
          f"({time.time() - t_inv:.1f}s)", flush=True)
    real = apply_trigger(data.attack['trigger'], data.x_train[:1])[0]
    png_path = ctx.paths['trigger picture']
    os.makedirs(os.path.dirname(os.path.abspath(png_path)), exist_ok=True)
    trigger_picture(pattern.cpu(), data.x_train[0], real).save(png_path)
    if args.epochs == 0:
        return unchanged()
    ctx.checkpoint_meta['mcl'] = {'target_label': target, 'pattern': pattern.cpu(), 'pixels': info['pixels']}
    return contrastive_steps(args, run, target, pattern)


def contrastive_steps(args, run, target, pattern):
    """The contrastive steps for the inverted `pattern` of class `target`. A batch's "labels" are its
    images' row numbers in run.x, which index the frozen features."""
    model = run.model
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
                                          augment_data=args.augment, drop_last=args.drop_last)
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
