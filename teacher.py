"""Fine-tuning on the defender's clean subset: the teacher of NAD and ARGD, and the FT baseline.

As the NAD README describes its teacher (NAD's main.py with every beta 0): all layers,
cross-entropy only, crop + flip + Cutout, SGD Nesterov (momentum 0.9, weight decay 1e-4),
--teacher_lr for epochs 0-1 and a tenth of it after (config.DEFENSE_SCHEDULES['finetune']).
"""
import os

import torch.nn.functional as F

from config import DEFENSE_SCHEDULES
from cli import UserError
from data_loader import train_batches
from files import content_hash
from utils import defense_meta, fit, step_lr


def teacher_path(args, s_name):
    return args.t_model or os.path.join(args.checkpoint_root, 't_net', f'{s_name}.tar')


def distillation_batches(args, run, normalizer=None):
    """The distillation defenses' data (NAD/ARGD get_train_loader): crop + flip + Cutout, and no
    ragged last batch, which at lr 0.1 would be one large step on a handful of images. normalizer:
    the model's (default) or another (raw [0,1] where images are changed before normalising)."""
    return lambda epoch: train_batches(run.x, run.y, args.batch_size, normalizer or run.data.normalizer, args.seed,
                                       epoch, drop_last=True, cutout=args.cutout, crop_flip=run.data.crop_flip)


def finetune(args, run, model, out, csv_path, tag='teacher'):
    """Fine-tune `model` in place on the clean subset run.x/run.y, save it to `out`; returns its metrics."""
    schedule = DEFENSE_SCHEDULES['finetune']
    lr_at = lambda epoch: step_lr(args.teacher_lr, epoch, schedule['milestones'], schedule['factors'])
    loss_fn = lambda x, y: F.cross_entropy(model(x), y)
    meta = dict(defense_meta(run.meta, args, 'finetune'), student=content_hash(run.s_path))  # see check_student
    return fit(args, model, loss_fn, distillation_batches(args, run), lr_at, run.data.test, run.data.normalizer,
               out_path=out, csv_path=csv_path, meta=meta,
               epochs=args.teacher_epochs, nesterov=True, evaluate_first=True, tag=tag)


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
