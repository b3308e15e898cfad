"""Erase a backdoor with ARGD (default) or NAD: distil the backdoored student from a teacher
fine-tuned on a small clean subset.

    python main-ARGD.py --data_root /tmp/data/cifar10                  # shipped student and teacher
    python main-ARGD.py --defense nad --s_model weight/s_net/blend.tar

If --t_model does not exist, a teacher is fine-tuned first (train_teacher.py) and saved there.
Schedule: the published step shape (SGD Nesterov, momentum 0.9, weight decay 1e-4; --lr for
epochs 0-2, --lr/10 for 3-5, --lr/100 after) from --lr 0.01: the published 0.1 wrecks a
WRN-16-1 distilled on 2,500 images (ACC 84 -> 40 on CIFAR-10, README). The erased model goes
to <checkpoint_root>/erasing_net/.
"""
import copy
import os
import time

import torch
import torch.nn.functional as F

from argd import ARGDLoss
from at import nad_loss
from config import main_guard, parse_args
from data_loader import train_batches
from train_teacher import finetune, teacher_path
from utils import check_writable, defense_meta, defense_setup, fit, load_model, summary_line

DEFAULTS = dict(epochs=10, batch_size=64, lr=0.01, weight_decay=1e-4, description=__doc__.split('\n')[0])


def group_channels(model, image_size, device):
    with torch.no_grad():
        model.eval()
        _, feats, _ = model(torch.zeros(2, 3, image_size, image_size, device=device), features=True)
    return [f.shape[1] for f in feats]


def main():
    args = parse_args(**DEFAULTS)
    t0 = time.time()
    run = defense_setup(args)
    student, data = run.model, run.data
    t_path = teacher_path(args, run.s_name)
    suffix = '' if args.defense == 'argd' else f'-{args.defense}'
    out = args.output or os.path.join(args.checkpoint_root, 'erasing_net', f'{run.s_name}{suffix}.tar')
    csv_path = os.path.join(args.log_root, f'{args.defense}_{run.s_name}.csv')
    for path in (out, csv_path, t_path):
        check_writable(path)

    if os.path.exists(t_path):
        teacher, _ = load_model(t_path, args, data.num_classes, run.device)
    else:
        print(f'teacher {t_path} not found: fine-tuning one from {run.s_path} on the clean subset first')
        teacher = copy.deepcopy(student)
        finetune(args, run, teacher, t_path, os.path.join(args.log_root, f'teacher_{run.s_name}.csv'))
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)

    torch.manual_seed(args.seed)
    if args.defense == 'argd':
        criterion = ARGDLoss(group_channels(student, data.image_size, run.device),
                             group_channels(teacher, data.image_size, run.device), args.vert_weights, args.w_vert,
                             args.w_edge, args.w_emb, args.qk_dim, args.p).to(run.device)
        extra = {'argd': criterion}
    else:
        criterion = lambda fs, ft: nad_loss(fs, ft, (args.beta1, args.beta2, args.beta3), args.p)
        extra = {}

    def loss_fn(x, y):
        logits, feats_s, _ = student(x, features=True)
        with torch.no_grad():
            _, feats_t, _ = teacher(x, features=True)
        return F.cross_entropy(logits, y) + criterion(feats_s, feats_t)

    params = list(student.parameters()) + [p for m in extra.values() for p in m.parameters()]
    lr_at = lambda epoch: args.lr * (1.0 if epoch < 3 else 0.1 if epoch < 6 else 0.01)
    # BatchNorm1d in ARGD's projections cannot take a batch of one: drop the ragged tail
    batches = lambda epoch: train_batches(run.x, run.y, args.batch_size, data.normalizer, args.seed, epoch,
                                          drop_last=True)
    metrics = fit(args, student, loss_fn, batches, lr_at, data.test, data.normalizer, out_path=out,
                  csv_path=csv_path, meta=defense_meta(run.meta, args, args.defense), params=params,
                  extra_modules=extra, nesterov=True, evaluate_first=True, tag=args.defense)
    print(f'saved {out} ({time.time() - t0:.0f}s); log {csv_path}')
    print(summary_line(metrics, args.json))


if __name__ == '__main__':
    main_guard(main)
