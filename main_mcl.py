"""Erase a backdoor with MCL: invert the trigger on the clean subset, then model-contrastive
fine-tuning. Without --target_label the target is detected first (Neural Cleanse's rule).

    python main_mcl.py --data_root /tmp/data/cifar10                  # detect the target, then erase
    python main_mcl.py --target_label 0 --data_root /tmp/data/cifar10 # known target
    python main_mcl.py --epochs 0 --data_root /tmp/data/cifar10       # detection only

Erasing: SGD momentum 0.9, weight decay 1e-4, lr --lr for epoch 0, --lr/10 to epoch 9,
--lr/100 after; no augmentation (as published). Output: <checkpoint_root>/mcl_net/<s_name>.tar,
the CSV and a picture of the inverted trigger under --log_root.
"""
import os
import time

import torch

from config import UserError, main_guard, parse_args
from data_loader import Normalizer, train_batches
from mcl import contrastive_loss, detect_target, frozen_features, invert_trigger, trigger_picture
from triggers import apply_trigger
from utils import check_writable, defense_meta, defense_setup, evaluate, fit, summary_line

DEFAULTS = dict(epochs=20, batch_size=64, lr=0.1, weight_decay=1e-4, description=__doc__.split('\n')[0])


def find_target(args, run):
    """Invert a pattern per class with a short budget. Returns (detected label or None, its anomaly
    index, max anomaly index, smallest-pattern class, the patterns with their info)."""
    norms, patterns = [], []
    for c in range(run.data.num_classes):
        pattern, info = invert_trigger(run.model, run.x, c, run.data.normalizer, args.detect_steps, args.inv_batch,
                                       args.inv_patience, args.asr_bound, args.init_cost, seed=args.seed)
        norms.append(info['l1'])
        patterns.append((pattern, info))
        print(f"class {c}: pattern L1 {info['l1']:.2f}, {info['pixels']} pixels, "
              f"{'reached' if info['found'] else 'missed'} the bound in {info['steps']} steps", flush=True)
    label, index, indices = detect_target(norms)
    print('anomaly index per class: ' + ' '.join(f'{c}:{v:.2f}' for c, v in enumerate(indices)))
    return label, index, max(indices), min(range(len(norms)), key=norms.__getitem__), patterns


def main():
    args = parse_args(**DEFAULTS)
    t0 = time.time()
    explicit_target = args.target_label
    run = defense_setup(args)
    model, data = run.model, run.data
    out = args.output or os.path.join(args.checkpoint_root, 'mcl_net', f'{run.s_name}.tar')
    csv_path = os.path.join(args.log_root, f'mcl_{run.s_name}.csv')
    png_path = os.path.join(args.log_root, f'mcl_{run.s_name}_trigger.png')
    for path in (out, csv_path, png_path):
        check_writable(path)

    target, detected = explicit_target, None
    if target is None:
        target, index, max_index, smallest, detected = find_target(args, run)
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
            print(f'detected target label: {target} (anomaly index {index:.2f})')
    if not 0 <= target < data.num_classes:
        raise UserError(f'target label {target} is outside [0, {data.num_classes})')

    t_inv = time.time()
    if detected and args.epochs == 0:  # detection only: picture the pattern detection found
        pattern, info = detected[target]
    else:  # erasing gets the full inversion budget
        pattern, info = invert_trigger(model, run.x, target, data.normalizer, args.inv_steps, args.inv_batch,
                                       args.inv_patience, args.asr_bound, args.init_cost, seed=args.seed)
    print(f"inverted trigger for class {target}: {info['pixels']} pixels, L1 {info['l1']:.2f}, "
          f"success {100 * info['asr']:.1f}% after {info['steps']} steps ({time.time() - t_inv:.1f}s)")
    real = apply_trigger(data.attack['trigger'], data.x_train[:1])[0]
    os.makedirs(os.path.dirname(os.path.abspath(png_path)), exist_ok=True)
    trigger_picture(pattern.cpu(), data.x_train[0], real).save(png_path)
    if args.epochs == 0:
        print(summary_line(evaluate(model, data.test, data.normalizer, args.eval_batch_size, args.amp), args.json))
        return

    raw = Normalizer('none', run.device)  # batches in [0,1]: the pattern is added before normalising
    norm = data.normalizer.normalize_float
    positive, negative = frozen_features(model, run.x, pattern, raw, norm, args.eval_batch_size, args.amp)

    def loss_fn(x01, idx):  # the batch's "labels" are its row numbers in run.x
        _, _, anchor = model(norm((x01 + pattern).clamp(0, 1)), features=True)
        return contrastive_loss(anchor, positive[idx], negative[idx], args.temperature)

    lr_at = lambda epoch: args.lr * (1.0 if epoch < 1 else 0.1 if epoch < 10 else 0.01)
    rows = torch.arange(len(run.x), device=run.device)
    batches = lambda epoch: train_batches(run.x, rows, args.batch_size, raw, args.seed, epoch, augment_data=False)
    meta = dict(defense_meta(run.meta, args, 'mcl'),
                mcl={'target_label': target, 'pattern': pattern.cpu(), 'pixels': info['pixels']})
    metrics = fit(args, model, loss_fn, batches, lr_at, data.test, data.normalizer, out_path=out, csv_path=csv_path,
                  meta=meta, evaluate_first=True, tag='mcl')
    print(f'saved {out} ({time.time() - t0:.0f}s); log {csv_path}; trigger picture {png_path}')
    print(summary_line(metrics, args.json))


if __name__ == '__main__':
    main_guard(main)
