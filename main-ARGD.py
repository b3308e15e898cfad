"""Erase a backdoor with ARGD (default) or NAD: distil the backdoored student from a teacher
fine-tuned on a small clean subset.

    python main-ARGD.py --data_root /tmp/data/cifar10                  # shipped student and teacher
    python main-ARGD.py --defense nad --s_model weight/s_net/blend.tar
    python main-ARGD.py --defense argd-si                                # ARGD-SI (below)

If --t_model does not exist, a teacher is fine-tuned first (train_teacher.py) and saved there.
As published: SGD Nesterov (momentum 0.9, weight decay 1e-4), crop + flip + Cutout, lr 0.1 with
each defense's own steps and epochs (config.DEFENSES: ARGD 10 epochs, /10 at epoch 3 and 6; NAD 20
epochs, /10 at 2, /100 at 20). The erased model goes to
<checkpoint_root>/erasing_net/.

Not in the papers (ARGD-SI: --defense argd-si, or --source inverted; file names <s_name>[-nad]-si): MCL's
detection's pattern (a synthesised trigger, main_ft.py's FT-SI) on --adv_share of each batch at true
labels. (PAM's path-aware gradient on top was measured not to help and is not kept: results/README.md.)
"""
import os

import torch

import defenses
from cli import main_guard, parse_args
from config import DEFENSES
from defenses import defense_meta, defense_setup, finish
from defenses.ft import teacher_model, teacher_path
from files import check_writable
from training import fit
from utils import schedule


def main():
    args = parse_args('main-ARGD.py', description=__doc__.split('\n\n')[0])
    recipe = DEFENSES[args.defense]
    name = recipe['module']  # argd or nad; argd-si is argd with --source inverted
    run = defense_setup(args)
    student, data = run.model, run.data
    t_path = teacher_path(args, run.s_name)
    si = '-si' if args.source == 'inverted' else ''  # the variant's own file names
    out = args.output or os.path.join(args.checkpoint_root, 'erasing_net',
                                      f"{run.s_name}{'' if name == 'argd' else '-' + name}{si}.tar")
    csv_path = os.path.join(args.log_root, f'{name}{si}_{run.s_name}.csv')
    for path in (out, csv_path, t_path):
        check_writable(path)

    teacher = teacher_model(args, run, t_path)

    torch.manual_seed(args.seed)
    steps = defenses.module(args.defense).build(args, run, teacher)
    metrics = fit(args, student, steps, schedule(recipe, args.lr, args.epochs), data.test, data.normalizer,
                  out_path=out, csv_path=csv_path, meta=dict(defense_meta(run.meta, args, name), **steps.meta),
                  nesterov=recipe['nesterov'], evaluate_first=True, tag=name)
    metrics.update(steps.meta)
    finish(run, student, args, metrics, out, csv_path)


if __name__ == '__main__':
    main_guard(main)
