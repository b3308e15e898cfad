"""Erase a backdoor with ARGD (default) or NAD: distil the backdoored student from a teacher
fine-tuned on a small clean subset.

    python main-ARGD.py --data_root /tmp/data/cifar10                  # shipped student and teacher
    python main-ARGD.py --defense nad --s_model weight/s_net/blend.tar

If --t_model does not exist, a teacher is fine-tuned first (train_teacher.py) and saved there.
As published: SGD Nesterov (momentum 0.9, weight decay 1e-4), crop + flip + Cutout, lr 0.1 with
each defense's own steps and epochs (config.DEFENSE_SCHEDULES: ARGD 10 epochs, /10 at epoch 3
and 6; NAD 20 epochs, /10 at 2, /100 at 20). The erased model goes to
<checkpoint_root>/erasing_net/.

Not in the papers (the -SI variant, file names <s_name>[-nad]-si): --source inverted stamps MCL's
detection's pattern (a synthesised trigger, main_ft.py's FT-SI) on --adv_share of each batch at true
labels. (PAM's path-aware gradient on top was measured not to help and is not kept: results/README.md.)
"""
import copy
import os
import time

import torch
import torch.nn.functional as F

from argd import ARGDLoss
from at import nad_loss
from cli import main_guard, parse_args
from config import DEFENSE_SCHEDULES
from data_loader import Normalizer
from files import check_writable
from mcl import synthesised_trigger
from purify import with_pattern_share
from teacher import check_student, distillation_batches, finetune, teacher_path
from utils import defender_check, defense_meta, defense_setup, fit, load_model, step_lr, summary_line


def variant_suffix(args):
    """-si with a synthesised trigger: the variant's own file names."""
    return '-si' if args.source == 'inverted' else ''


def main():
    args = parse_args('main-ARGD.py', description=__doc__.split('\n\n')[0])
    schedule = DEFENSE_SCHEDULES[args.defense]
    args.epochs = schedule['epochs'] if args.epochs is None else args.epochs
    t0 = time.time()
    run = defense_setup(args)
    student, data = run.model, run.data
    t_path = teacher_path(args, run.s_name)
    suffix = ('' if args.defense == 'argd' else f'-{args.defense}') + variant_suffix(args)
    out = args.output or os.path.join(args.checkpoint_root, 'erasing_net', f'{run.s_name}{suffix}.tar')
    csv_path = os.path.join(args.log_root, f'{args.defense}{variant_suffix(args)}_{run.s_name}.csv')
    for path in (out, csv_path, t_path):
        check_writable(path)

    if os.path.exists(t_path):
        teacher, t_meta = load_model(t_path, args, data.num_classes, run.device)
        check_student(t_meta, t_path, run)
    else:
        print(f'teacher {t_path} not found: fine-tuning one from {run.s_path} on the clean subset first')
        teacher = copy.deepcopy(student)
        finetune(args, run, teacher, t_path, os.path.join(args.log_root, f'teacher_{run.s_name}.csv'))
    teacher.eval()
    teacher.requires_grad_(False)

    torch.manual_seed(args.seed)
    if args.defense == 'argd':
        criterion = ARGDLoss(3, args.vert_weights, args.w_vert, args.w_edge, args.w_emb, args.qk_dim, args.p,
                             trainable=args.train_projections).to(run.device)
        extra = {'argd': criterion}
    else:
        criterion = lambda fs, ft: nad_loss(fs, ft, (args.beta1, args.beta2, args.beta3), args.p)
        extra = {}

    def loss_fn(x, y):
        logits, feats_s, _ = student(x, features=True)
        with torch.no_grad():
            _, feats_t, _ = teacher(x, features=True)
        return F.cross_entropy(logits, y) + criterion(feats_s, feats_t)

    batches, synthesised = distillation_batches(args, run), {}
    if args.source == 'inverted':  # not in the papers: a synthesised trigger at true labels, on both networks
        (pattern, synthesised), raw = synthesised_trigger(run, args.seed, args.amp), Normalizer('none', run.device)
        batches = lambda epoch: ((data.normalizer.normalize_float(with_pattern_share(x01, pattern, args.adv_share)), y)
                                 for x01, y in distillation_batches(args, run, raw)(epoch))
    params = list(student.parameters()) + [p for m in extra.values() for p in m.parameters() if p.requires_grad]
    lr_at = lambda epoch: step_lr(args.lr, epoch, schedule['milestones'], schedule['factors'])
    metrics = fit(args, student, loss_fn, batches, lr_at, data.test, data.normalizer,
                  out_path=out, csv_path=csv_path, meta=dict(defense_meta(run.meta, args, args.defense), **synthesised),
                  params=params,
                  extra_modules=extra, nesterov=True, evaluate_first=True, tag=args.defense)
    metrics.update(synthesised)
    defender_check(run, student, args, metrics)
    print(f'saved {out} ({time.time() - t0:.0f}s); log {csv_path}')
    print(summary_line(metrics, args.json))


if __name__ == '__main__':
    main_guard(main)
