"""FT: fine-tune the backdoored model on the defender's clean subset. NAD's and ARGD's teacher, and the
baseline every defense must beat (train_teacher.py).

As the NAD README describes its teacher (NAD's main.py with every beta 0): all layers, cross-entropy
only, crop + flip + Cutout, SGD Nesterov, --teacher_lr for epochs 0-1 and a tenth of it after
(config.DEFENSES['ft']).
"""
import copy
import os
from types import SimpleNamespace

import torch.nn.functional as F

import options as groups
from checkpoints import load_model
from config import DEFENSES
from defenses import clean_batches, defense_meta
from errors import UserError
from files import content_hash
from training import Steps, fit
from utils import schedule

KEY = 'ft'
KEYS = {KEY: dict(label='FT')}  # blind; its model is also NAD's, ARGD's and MCR's teacher


def options(add):
    groups.teacher(add)  # --t_model: where FT's model goes; --teacher_epochs, --teacher_lr: its epochs and lr
    groups.recipe(add)


def tag(args):
    return 'teacher'


def meta_name(args):
    return 'finetune'


def output(args, s_name):
    return teacher_path(args, s_name)


def steps(args, run, model, recipe):
    """Cross-entropy on the clean subset's batches (NAD's get_train_loader: crop + flip + Cutout), FT's
    schedule of --teacher_lr over --teacher_epochs."""
    return Steps(batches=clean_batches(args, run, recipe=recipe), loss=lambda x, y: F.cross_entropy(model(x), y),
                 epochs=args.teacher_epochs, lr_at=schedule(recipe.schedule, args.teacher_lr, args.teacher_epochs,
                                                            recipe.milestones, recipe.factors))


def build(ctx):
    """FT as the defense run (train_teacher.py): its recipe from the run's options. The checkpoint records
    which student it was fine-tuned from (see check_student)."""
    ctx.checkpoint_meta['student'] = content_hash(ctx.s_path)
    return steps(ctx.args, ctx, ctx.model, ctx.args)


def teacher_path(args, s_name):
    return args.t_model or os.path.join(args.checkpoint_root, 't_net', f'{s_name}.tar')


def finetune(args, run, model, out, csv_path, tag='teacher'):
    """Fine-tune `model` in place on the clean subset run.x/run.y as FT's entry has it (another defense's
    teacher: its batch size, momentum and weight decay are the run's), save it to `out`; returns its metrics."""
    recipe = SimpleNamespace(**DEFENSES[KEY])
    meta = dict(defense_meta(run.meta, args, 'finetune'), student=content_hash(run.s_path))  # see check_student
    teach = steps(args, run, model, recipe)
    return fit(args, model, teach, teach.lr_at, run.data.test, run.data.normalizer, out_path=out, csv_path=csv_path,
               meta=meta, nesterov=recipe.nesterov, evaluate_first=True, tag=tag)


def teacher_model(args, run, t_path):
    """The teacher at t_path (checked to be this student's), or, where there is none, the student fine-tuned on
    the clean subset first and saved there. Returned frozen in eval mode."""
    if os.path.exists(t_path):
        teacher, t_meta = load_model(t_path, args, run.data.num_classes, run.device)
        check_student(t_meta, t_path, run)
    else:
        print(f'teacher {t_path} not found: fine-tuning one from {run.s_path} on the clean subset first')
        teacher = copy.deepcopy(run.model)
        finetune(args, run, teacher, t_path, os.path.join(args.log_root, f'teacher_{run.s_name}.csv'))
    teacher.eval()
    teacher.requires_grad_(False)
    return teacher


def check_student(t_meta, t_path, run):
    """A teacher found on disk must be the one fine-tuned from this student: its meta records the
    student's content hash (a retrained student under the old name would otherwise be paired with
    the old teacher, silently)."""
    made_from, given = t_meta.get('student'), content_hash(run.s_path)
    if made_from is None:
        print(f'note: {t_path} does not record which student it was fine-tuned from; assumed to be {run.s_path}')
    elif made_from != given:
        raise UserError(f'{t_path} was fine-tuned from another student (content {made_from}; {run.s_path} is {given}): '
                        'delete it to fine-tune a new teacher, or pass --t_model')
