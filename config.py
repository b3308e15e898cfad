"""Every option of every script, with its default and what it means, in one place.

Scripts call parse_args(**script_defaults); a script's own defaults (epochs, lr, ...) sit in
one visible dict at its top. Attack and model options default to None, meaning "take it
from the checkpoint's meta, else from ATTACK_DEFAULTS / the data set".
"""
import argparse
import sys

from models import MODELS
from triggers import TRIGGERS

DATASETS = ('CIFAR10', 'CIFAR100', 'GTSRB', 'ImageFolder')
TARGET_TYPES = ('all2one', 'all2all', 'cleanLabel')
DEFENSES = ('argd', 'nad')

# What an attack option means when neither the flag nor a checkpoint's meta sets it.
ATTACK_DEFAULTS = dict(trigger_type='gridTrigger', target_type='all2one', target_label=0,
                       inject_portion=0.1, trig_w=3, trig_h=3)


class UserError(Exception):
    """Bad input. Scripts print it as one line on stderr and exit with status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not argparse's usage block
        raise UserError(message)


def get_arguments(**script_defaults):
    p = _Parser(description=script_defaults.pop('description', None))
    a = p.add_argument
    # --- data and paths
    a('--dataset', default='CIFAR10', help=f'data set: {", ".join(DATASETS)}')
    a('--data_root', default='./data', help='where the data set is downloaded and cached, or an image-folder '
      'tree <root>/train/<class>/*, <root>/test/<class>/* (used offline, even for CIFAR10)')
    a('--checkpoint_root', default='./weight', help='models are written under this folder')
    a('--log_root', default='./logs', help='per-run CSV logs are written under this folder')
    a('--s_model', default=None, help='model under defense (default: <checkpoint_root>/s_net/<arch>.tar)')
    a('--t_model', default=None, help='teacher model (default: <checkpoint_root>/t_net/<arch>.tar; '
      'fine-tuned from --s_model first if the file does not exist)')
    a('--model', default=None, help='evaluate.py: the checkpoint to evaluate')
    a('--output', default=None, help='where a training script writes its final model (default: per script)')
    a('--resume', action='store_true', help='continue an interrupted run from its <output>.resume file')
    a('--json', action='store_true', help='print the final summary as one JSON object')
    # --- model and input
    a('--arch', default=None, help=f'architecture when no meta says it (default WRN-16-1): {", ".join(MODELS)}')
    a('--num_class', type=int, default=None, help='number of classes (default: from the data set)')
    a('--image_size', type=int, default=None, help='image side in pixels; image folders are resized to it '
      '(default: 32)')
    a('--normalize', default=None, help="input normalisation the model expects: 'cifar' (CIFAR mean/std, "
      "default for CIFAR data sets), 'none' (raw [0,1]), or six numbers 'm1,m2,m3,s1,s2,s3' "
      '(default: from the checkpoint meta, else the data set)')
    # --- optimisation (scripts set their own defaults)
    a('--epochs', type=int, default=10, help='training epochs')
    a('--batch_size', type=int, default=64, help='training batch size')
    a('--lr', type=float, default=0.1, help='initial learning rate (the schedule is per script, see README)')
    a('--momentum', type=float, default=0.9, help='SGD momentum')
    a('--weight_decay', type=float, default=1e-4, help='SGD weight decay')
    a('--seed', type=int, default=0, help='fixes data subsets, poisoned indices, augmentation and initialisation')
    a('--device', default=None, help="'cuda', 'cpu', ... (default: cuda when available, else cpu)")
    a('--no_augment', action='store_true', help='train_badnet.py: no random crop/flip (the trigger stays in place)')
    a('--eval_every', type=int, default=1, help='evaluate on the test sets every k epochs (always after the last)')
    a('--eval_subset', type=int, default=2000, help='per-epoch rows score a fixed random N images of each test set '
      '(0 = all); the final model is always scored on all of them')
    a('--eval_batch_size', type=int, default=None, help='batch size for evaluation (default: 256 on CPU, faster '
      'than 1000 there in every paired run, and 1000 on CUDA)')
    a('--precision', default='auto', choices=('auto', 'fp32', 'bf16'),
      help='auto = bf16 autocast on CUDA, fp32 on CPU')
    a('--compile', action='store_true', help='torch.compile the model (CUDA; slow to start)')
    a('--threads', type=int, default=None, help='CPU threads for torch (default: torch chooses)')
    # --- attack (train_badnet.py builds it; other scripts evaluate with it)
    a('--ratio', type=float, default=0.05, help='fraction of the training set the defense may use (clean), in (0, 1]')
    a('--inject_portion', type=float, default=None, help='poisoned fraction of the training set in (0, 1] '
      '(cleanLabel: fraction of the target-class images); default 0.1')
    a('--target_label', type=int, default=None, help='attack target class (default: meta, else 0)')
    a('--trigger_type', default=None, help=f'trigger (default: meta, else gridTrigger): {", ".join(TRIGGERS)}')
    a('--target_type', default=None, help=f'label rule (default: meta, else all2one): {", ".join(TARGET_TYPES)}')
    a('--trig_w', type=int, default=None, help='squareTrigger width (default 3)')
    a('--trig_h', type=int, default=None, help='squareTrigger height (default 3)')
    a('--trigger_path', default=None, help='image/.npy pattern: blendTrigger (optional), trojanTrigger (required)')
    # --- teacher, NAD and ARGD
    a('--defense', default='argd', help=f'main-ARGD.py: {", ".join(DEFENSES)} (the FT baseline is train_teacher.py)')
    a('--teacher_epochs', type=int, default=10, help='epochs of teacher fine-tuning (train_teacher.py)')
    a('--teacher_lr', type=float, default=0.01, help='initial lr of teacher fine-tuning')
    a('--p', type=float, default=2.0, help='AT: power of |activation| in the attention map')
    a('--beta1', type=float, default=5000, help='NAD: AT weight on group 1')
    a('--beta2', type=float, default=5000, help='NAD: AT weight on group 2')
    a('--beta3', type=float, default=5000, help='NAD: AT weight on group 3')
    a('--vert_weights', default='2000,5000,2000', help='ARGD: vertex (AT) weights of groups 1,2,3')
    a('--w_vert', type=float, default=1.0, help='ARGD: weight of the vertex loss')
    a('--w_edge', type=float, default=1.0, help='ARGD: weight of the edge (relation graph) loss')
    a('--w_emb', type=float, default=1.0, help='ARGD: weight of the embedding (cross-layer attention) loss')
    a('--qk_dim', type=int, default=128, help='ARGD: query/key dimension of the embedding loss')
    # --- MCL
    a('--temperature', type=float, default=0.5, help='MCL: temperature of the contrastive logits')
    a('--inv_steps', type=int, default=300, help='MCL: max optimisation steps of trigger inversion')
    a('--inv_batch', type=int, default=128, help='MCL: clean images per inversion step')
    a('--inv_patience', type=int, default=60, help='MCL: stop inversion after this many steps without a smaller pattern')
    a('--detect_steps', type=int, default=120, help='MCL: inversion steps per class when detecting the target')
    a('--asr_bound', type=float, default=0.9, help='MCL: attack success a pattern must reach to count')
    a('--init_cost', type=float, default=1e-3, help='MCL: initial weight of the pattern-size penalty')
    a('--force', action='store_true', help='MCL: erase even when no target label is detected')
    # --- benchmark.py
    a('--end_to_end', action='store_true', help='benchmark.py: also time FT, NAD, ARGD and MCL end to end on '
      '--data_root with the shipped models (minutes on a CPU)')
    # --- run_table.py
    a('--attacks', default='badnet,blend,sig,wanet', help='run_table.py: rows of the table (badnet, blend, sig, wanet)')
    a('--table_dir', default='./results', help='run_table.py: where table.csv, table.md and the logs go')
    p.set_defaults(**script_defaults)
    return p


def parse_args(argv=None, **script_defaults):
    args = get_arguments(**script_defaults).parse_args(argv)
    check_args(args)
    return args


def check_args(args):
    """Reject what can be rejected before any data or model is touched."""
    if args.dataset not in DATASETS:
        raise UserError(f"unknown dataset '{args.dataset}' (choose from {', '.join(DATASETS)})")
    if args.arch is not None and args.arch not in MODELS:
        raise UserError(f"unknown model '{args.arch}' (choose from {', '.join(MODELS)})")
    if args.trigger_type is not None and args.trigger_type not in TRIGGERS:
        raise UserError(f"unknown trigger '{args.trigger_type}' (choose from {', '.join(TRIGGERS)})")
    if args.target_type is not None and args.target_type not in TARGET_TYPES:
        raise UserError(f"unknown target type '{args.target_type}' (choose from {', '.join(TARGET_TYPES)})")
    if args.defense not in DEFENSES:
        raise UserError(f"unknown defense '{args.defense}' (choose from {', '.join(DEFENSES)})")
    if not 0 < args.ratio <= 1:
        raise UserError(f'--ratio must be in (0, 1], got {args.ratio}')
    if args.inject_portion is not None and not 0 < args.inject_portion <= 1:
        raise UserError(f'--inject_portion must be in (0, 1], got {args.inject_portion}')
    if args.num_class is not None and args.num_class < 2:
        raise UserError(f'--num_class must be at least 2, got {args.num_class}')
    if args.target_label is not None and args.target_label < 0:
        raise UserError(f'--target_label must be >= 0, got {args.target_label}')
    for name in ('epochs', 'teacher_epochs', 'eval_subset'):
        if getattr(args, name) < 0:
            raise UserError(f'--{name} must be >= 0')
    for name in ('batch_size', 'eval_every', 'eval_batch_size', 'inv_batch'):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise UserError(f'--{name} must be >= 1')
    try:
        args.vert_weights = [float(v) for v in str(args.vert_weights).split(',')]
        assert len(args.vert_weights) == 3
    except (ValueError, AssertionError):
        raise UserError(f"--vert_weights needs three comma-separated numbers, got '{args.vert_weights}'")
    if args.normalize is not None:
        parse_normalize(args.normalize)


NORMALIZATIONS = {'cifar': ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)),
                  'none': ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))}


def parse_normalize(spec):
    """'cifar' | 'none' | 'm1,m2,m3,s1,s2,s3' -> [m1, m2, m3, s1, s2, s3]."""
    if spec in NORMALIZATIONS:
        mean, std = NORMALIZATIONS[spec]
        return list(mean) + list(std)
    try:
        values = [float(v) for v in spec.split(',')]
    except ValueError:
        values = []
    if len(values) != 6 or min(values[3:]) <= 0:
        raise UserError(f"--normalize must be 'cifar', 'none' or six numbers 'm1,m2,m3,s1,s2,s3' with std > 0, got '{spec}'")
    return values


def main_guard(main):
    """Run a script's main(); bad input ends as one line on stderr and exit status 2."""
    try:
        main()
    except UserError as e:
        sys.stderr.write(f'error: {e}\n')
        sys.exit(2)
    except KeyboardInterrupt:
        sys.stderr.write('interrupted\n')
        sys.exit(130)
