"""Erase a backdoor with MCL: invert the trigger on the clean subset, then model-contrastive
fine-tuning. With --mcl_target auto (default) the target is detected first (Neural Cleanse's
rule). MCL never sees the attack: --target_label and the other attack options (or the
checkpoint's meta) only say what evaluation scores against.

    python main_mcl.py --data_root /tmp/data/cifar10                  # detect the target, then erase
    python main_mcl.py --mcl_target 0 --data_root /tmp/data/cifar10   # tell MCL the target
    python main_mcl.py --epochs 0 --data_root /tmp/data/cifar10       # detection only

As published: inversion over --inv_epochs 100 passes of the clean subset; erasing with SGD
momentum 0.9, weight decay 1e-4, lr 0.1 for epoch 0, 0.01 to epoch 9, 0.001 after
(config.DEFENSE_SCHEDULES['mcl']), no augmentation, no ragged last batch. Output:
<checkpoint_root>/mcl_net/<s_name>.tar, the CSV and a picture of the inverted trigger under --log_root.

--keep_target (MCL-TK, not in the paper) keeps the target class: the clean images the model assigns to
the target are left out of the contrastive term, whose push away from the triggered features would push
them away from their own class, and cross-entropy on the clean images anchors every class (mcl.py).
Output: mcl-tk_net/ and mcl-tk_* files.
"""
import os
import time

import torch

from cli import UserError, main_guard, parse_args
from config import DEFENSE_SCHEDULES
from data_loader import Normalizer, train_batches
from files import check_writable
from mcl import (add_pattern, contrastive_loss, find_target, frozen_features, invert_triggers, keep_target_loss,
                 trigger_picture)
from triggers import apply_trigger
from utils import defender_check, defense_meta, defense_setup, evaluate, fit, predict, step_lr, summary_line


def invert(args, run, targets, passes, report=None):
    return invert_triggers(run.model, run.x, targets, run.data.normalizer, passes, args.batch_size, args.inv_patience,
                           args.asr_bound, args.init_cost, seed=args.seed, amp=args.amp, report=report)


def true_target(args, run):
    """How the evaluation's target is known, for the detection line."""
    label = run.data.attack['target_label']
    if 'target_label' not in args.given and 'target_label' not in run.meta.get('attack', {}):
        return f'true target unknown: no meta, no --target_label; scored against {label} (config.ATTACK)'
    return f'true target {label}'


def main():
    args = parse_args('main_mcl.py', description=__doc__.split('\n\n')[0])
    t0 = time.time()
    run = defense_setup(args)
    model, data = run.model, run.data
    tag = 'mcl-tk' if args.keep_target else 'mcl'
    csv_path = os.path.join(args.log_root, f'{tag}_{run.s_name}.csv')
    png_path = os.path.join(args.log_root, f'{tag}_{run.s_name}_trigger.png')
    out = args.output or os.path.join(args.checkpoint_root, f'{tag}_net', f'{run.s_name}.tar')
    for path in (out, csv_path, png_path):
        check_writable(path)

    # MCL is told only --mcl_target; evaluation scores against the true attack (meta or attack flags)
    truth = true_target(args, run)
    target, detected = (None if args.mcl_target == 'auto' else int(args.mcl_target)), None
    if target is None:
        target, index, max_index, smallest, detected = find_target(
            run.model, run.x, run.data.normalizer, run.data.num_classes, args.detect_epochs, args.batch_size,
            args.inv_patience, args.asr_bound, args.init_cost, args.seed, args.amp)
        if target is None:
            print(f'no target label detected (max anomaly index {max_index:.2f})')
            if not args.force or args.epochs == 0:
                print('the model looks clean: left unchanged (--force erases with the smallest-pattern class)')
                print(summary_line(evaluate(model, data.test, data.normalizer, args.eval_batch_size, args.amp),
                                   args.json))
                return
            target = smallest
            print(f'--force: erasing with class {target}, the smallest pattern')
        else:
            print(f'detected target label: {target} ({truth}; anomaly index {index:.2f})')
    if not 0 <= target < data.num_classes:
        raise UserError(f'--mcl_target {target} is outside [0, {data.num_classes})')

    t_inv = time.time()
    if detected and args.epochs == 0:  # detection only: picture the pattern detection found
        pattern, info = detected[target]
    else:  # erasing gets the full inversion budget
        (pattern, info), = invert(args, run, [target], args.inv_epochs, report=lambda text: print(text, flush=True))
    if not info['found']:
        print(f'no pattern reached {100 * args.asr_bound:.0f}% success in {info["passes"]} passes: as the reference, '
              'the inverted pattern is all zero: positive and negative features are equal, the contrastive loss has no '
              'gradient, and erasing changes the model only through weight decay')
    print(f"inverted trigger for class {target}: {info['pixels']} pixels, L1 {info['l1']:.2f}, "
          f"success {100 * info['asr']:.1f}% on the clean subset after {info['passes']} passes "
          f"({time.time() - t_inv:.1f}s)", flush=True)
    real = apply_trigger(data.attack['trigger'], data.x_train[:1])[0]
    os.makedirs(os.path.dirname(os.path.abspath(png_path)), exist_ok=True)
    trigger_picture(pattern.cpu(), data.x_train[0], real).save(png_path)
    if args.epochs == 0:
        print(summary_line(evaluate(model, data.test, data.normalizer, args.eval_batch_size, args.amp), args.json))
        return

    raw = Normalizer('none', run.device)  # batches in [0,1]: the pattern is added before normalising
    norm = data.normalizer.normalize_float
    positive, negative = frozen_features(model, run.x, pattern, raw, norm, args.eval_batch_size, args.amp)

    if args.keep_target:  # MCL-TK: see mcl.keep_target_loss
        pushed = predict(model, run.x, data.normalizer, args.eval_batch_size, args.amp) != target
        print(f'MCL-TK: {int((~pushed).sum())} of {len(pushed)} clean images the model assigns to class {target} '
              'are left out of the contrastive term; cross-entropy on the clean images anchors the rest', flush=True)

    def loss_fn(x01, idx):  # the batch's "labels" are its row numbers in run.x
        if args.keep_target:
            return keep_target_loss(model, x01, run.y[idx], pattern, norm, positive[idx], negative[idx], pushed[idx],
                                    args.temperature)
        _, _, anchor = model(norm(add_pattern(x01, pattern)), features=True)
        return contrastive_loss(anchor, positive[idx], negative[idx], args.temperature)

    schedule = DEFENSE_SCHEDULES['mcl']
    lr_at = lambda epoch: step_lr(args.lr, epoch, schedule['milestones'], schedule['factors'])
    rows = torch.arange(len(run.x), device=run.device)
    batches = lambda epoch: train_batches(run.x, rows, args.batch_size, raw, args.seed, epoch, augment_data=False,
                                          drop_last=True)
    meta = dict(defense_meta(run.meta, args, tag),
                mcl={'target_label': target, 'pattern': pattern.cpu(), 'pixels': info['pixels']})
    metrics = fit(args, model, loss_fn, batches, lr_at, data.test, data.normalizer, out_path=out, csv_path=csv_path,
                  meta=meta, evaluate_first=True, tag=tag)
    defender_check(run, model, args, metrics)
    print(f'saved {out} ({time.time() - t0:.0f}s); log {csv_path}; trigger picture {png_path}')
    print(summary_line(metrics, args.json))


if __name__ == '__main__':
    main_guard(main)
