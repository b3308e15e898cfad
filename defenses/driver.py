"""The one driver of every registered defense (main_ft.py --defense KEY; main-ARGD.py, main_mcl.py,
train_teacher.py and main_strip.py are it with their own default key): the start, the teacher where the defense
needs one, the defense's steps, the one training loop, the defender's check and the summary; a run-time filter
(STRIP) only scores."""
import os

import torch

from defenses import defense_meta, defense_setup, finish, registry, tag_of
from defenses.ft import teacher_model, teacher_path
from files import check_writable
from training import fit
from utils import schedule


def defend(args):
    """Run the defense args.defense on args.s_model; the model goes to args.output (default: the defense's own
    place under --checkpoint_root), the per-epoch CSV to <log_root>/<tag>_<s_name>.csv."""
    spec = registry()[args.defense]
    run = defense_setup(args)
    if spec.filter:  # a run-time filter (STRIP): the model as it is, its scores printed, no file written
        run.args, run.key = args, args.defense
        return spec.module.build(run)
    tag = tag_of(args.defense, args)
    named = getattr(spec.module, 'output', None)
    out = args.output or (named(args, run.s_name) if named else
                          os.path.join(args.checkpoint_root, f'{tag}_net', f'{run.s_name}.tar'))
    csv_path = os.path.join(args.log_root, f'{tag}_{run.s_name}.csv')
    extra = getattr(spec.module, 'extra_files', lambda a, t, s: {})(args, tag, run.s_name)  # MCL's trigger picture
    t_path = teacher_path(args, run.s_name) if 'teacher' in spec.needs else None
    for path in (out, csv_path, *extra.values(), *([t_path] if t_path else [])):
        check_writable(path)
    ctx = run  # the context a defense builds from: the run's start, its options, its files, what it is given
    ctx.args, ctx.key, ctx.paths, ctx.checkpoint_meta = args, args.defense, dict(extra, out=out, csv=csv_path), {}
    ctx.teacher = teacher_model(args, run, t_path) if t_path else None

    torch.manual_seed(args.seed)
    steps = spec.module.build(ctx)
    if steps is None:  # the defense ended the run itself (MCL: no target, or detection only)
        return
    meta_name = getattr(spec.module, 'meta_name', lambda a: tag)(args)
    meta = dict(defense_meta(run.meta, args, meta_name), **ctx.checkpoint_meta, **steps.meta)
    lr_at = steps.lr_at or schedule(args.schedule, args.lr, args.epochs, args.milestones, args.factors)
    metrics = fit(args, run.model, steps, lr_at, run.data.test, run.data.normalizer, out_path=out, csv_path=csv_path,
                  meta=meta, nesterov=args.nesterov, evaluate_first=True, tag=tag, optimizer=args.optimizer)
    metrics.update(steps.meta)  # what the defense found (NC's flagged classes, ...): in the JSON summary too
    finish(run, run.model, args, metrics, out, csv_path, *(f'{k} {v}' for k, v in extra.items()))
