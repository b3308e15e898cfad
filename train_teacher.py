"""Fine-tune the backdoored model on the clean subset: ARGD/NAD's teacher, and the FT baseline.

    python train_teacher.py --data_root /tmp/data/cifar10            # weight/s_net/WRN-16-1.tar -> weight/t_net/
    python train_teacher.py --s_model weight/s_net/blend.tar --ratio 0.05 --teacher_epochs 10

All layers, cross-entropy only, crop+flip, SGD (momentum 0.9, weight decay 1e-4);
lr --teacher_lr for the first half of --teacher_epochs, a tenth of it after.
"""
import os
import time

import torch.nn.functional as F

from config import main_guard, parse_args
from data_loader import train_batches
from utils import check_writable, defense_meta, defense_setup, fit, summary_line

DEFAULTS = dict(batch_size=64, weight_decay=1e-4, description=__doc__.split('\n')[0])


def teacher_path(args, s_name):
    return args.t_model or os.path.join(args.checkpoint_root, 't_net', f'{s_name}.tar')


def finetune(args, run, model, out, csv_path, tag='teacher'):
    """Fine-tune `model` in place on the clean subset run.x/run.y, save it to `out`; returns its metrics."""
    half = max(args.teacher_epochs // 2, 1)
    lr_at = lambda epoch: args.teacher_lr * (1.0 if epoch < half else 0.1)
    batches = lambda epoch: train_batches(run.x, run.y, args.batch_size, run.data.normalizer, args.seed, epoch)
    loss_fn = lambda x, y: F.cross_entropy(model(x), y)
    return fit(args, model, loss_fn, batches, lr_at, run.data.test, run.data.normalizer, out_path=out,
               csv_path=csv_path, meta=defense_meta(run.meta, args, 'finetune'), epochs=args.teacher_epochs,
               evaluate_first=True, tag=tag)


def main():
    args = parse_args(**DEFAULTS)
    t0 = time.time()
    run = defense_setup(args)
    out = args.output or teacher_path(args, run.s_name)
    csv_path = os.path.join(args.log_root, f'teacher_{run.s_name}.csv')
    check_writable(out)
    check_writable(csv_path)
    metrics = finetune(args, run, run.model, out, csv_path)
    print(f'saved {out} ({time.time() - t0:.0f}s); log {csv_path}')
    print(summary_line(metrics, args.json))


if __name__ == '__main__':
    main_guard(main)
