"""Every default of every script, in one place: edit a value here to change what a script does
(as with the reference code's config.py); a command-line flag overrides it for one run.

Each script reads only its own options: parse_args('main-ARGD.py') builds a parser from the
option groups listed for that script in SCRIPTS (each option with its default and help), then
overlays the script's entry in SCRIPT_DEFAULTS. `python <script> --help` lists exactly those.
"""
import argparse
import sys

from models import MODELS
from triggers import TRIGGERS

DATASETS = ('CIFAR10', 'CIFAR100', 'GTSRB', 'ImageFolder')
TARGET_TYPES = ('all2one', 'all2all', 'cleanLabel')
DEFENSES = ('argd', 'nad')

# ============================================================================ per-script defaults
# Optimisation numbers are the reference code's (NAD: bboylyg/NAD, ARGD: BililiCode/ARGD,
# MCL: Zhihao151/MCL) unless a comment says otherwise.
SCRIPT_DEFAULTS = {
    'train_badnet.py': dict(
        recipe='mcl',        # training recipe of a reference code, see BADNET_RECIPES
        epochs=15,           # MCL's milestones are at 20 and 70 of 100 epochs; 15 (milestones scaled) fit a 2-core CPU (45 min)
        batch_size=64,       # NAD and MCL both train with 64
        lr=0.1,
        weight_decay=1e-4,
    ),
    'train_teacher.py': dict(
        batch_size=64,
        weight_decay=1e-4,
    ),
    'main-ARGD.py': dict(
        defense='argd',      # 'argd' or 'nad'; epochs and lr schedule follow the defense (DEFENSE_SCHEDULES)
        epochs=None,         # None: the defense's published count (ARGD 10, NAD 20)
        batch_size=64,
        lr=0.1,              # both papers' initial lr
        weight_decay=1e-4,
    ),
    'main_mcl.py': dict(
        epochs=20,
        batch_size=64,
        lr=0.1,              # MCL: 0.1 for epoch 0, 0.01 to epoch 9, 0.001 after (DEFENSE_SCHEDULES['mcl'])
        weight_decay=1e-4,
    ),
    'evaluate.py': dict(),
    'benchmark.py': dict(batch_size=128),  # the README's throughput table was measured at 128
    'run_table.py': dict(),
    'show_triggers.py': dict(output='results/triggers.png'),
    'plot_curves.py': dict(attacks='badnet'),
}

# How train_badnet.py trains, per reference code. milestones are fractions of --epochs where the
# lr is multiplied by the next factor.
BADNET_RECIPES = {
    # MCL train_badnet.py: crop(pad 4) + flip, the data set's normalisation (CIFAR mean/std), SGD
    # momentum 0.9 (no Nesterov), lr 0.1 -> 0.01 at epoch 20 -> 0.001 at epoch 70 (of 100): the
    # same fractions of --epochs here
    'mcl': dict(augment=True, normalize=None, nesterov=False, milestones=(0.2, 0.7), factors=(1, 0.1, 0.01)),
    # NAD train_badnet.py: raw [0,1] inputs, no augmentation, SGD Nesterov momentum 0.9, lr 0.1
    # constant (its drop comes at epoch 20, after its default 19-epoch run)
    'nad': dict(augment=False, normalize='none', nesterov=True, milestones=(), factors=(1,)),
}

# Defense lr schedules as the reference code has them: epoch milestones and factors of the initial
# lr (--lr, --teacher_lr); `epochs` is main-ARGD.py's default per defense.
DEFENSE_SCHEDULES = {
    'argd': dict(epochs=10, milestones=(3, 6), factors=(1, 0.1, 0.01)),    # ARGD utils.adjust_learning_rate
    'nad': dict(epochs=20, milestones=(2, 20), factors=(1, 0.1, 0.001)),   # NAD utils.adjust_learning_rate
    'finetune': dict(milestones=(2, 20), factors=(1, 0.1, 0.001)),         # NAD's teacher: main.py with beta 0
    'mcl': dict(milestones=(1, 10), factors=(1, 0.1, 0.01)),               # MCL fine_defense_adjust_learning_rate
}

# What an attack option means when neither the flag nor a checkpoint's meta sets it.
ATTACK_DEFAULTS = dict(trigger_type='gridTrigger', target_type='all2one', target_label=0,
                       inject_portion=0.1, trig_w=3, trig_h=3)


# ============================================================================ the options
def _run(a):
    a('--dataset', default='CIFAR10', help=f'data set: {", ".join(DATASETS)}')
    a('--data_root', default='./data', help='where the data set is downloaded and cached, or an image-folder '
      'tree <root>/train/<class>/*, <root>/test/<class>/* (used offline, even for CIFAR10)')
    a('--seed', type=int, default=0, help='fixes data subsets, poisoned indices, augmentation and initialisation')
    a('--device', default=None, help="'cuda', 'cpu', ... (default: cuda when available, else cpu)")
    a('--threads', type=int, default=None, help='CPU threads for torch (default: torch chooses)')
    a('--precision', default='auto', choices=('auto', 'fp32', 'bf16'), help='auto = bf16 autocast where the device computes bf16 natively (CUDA; CPUs with AMX or AVX512-BF16), else fp32')
    a('--eval_batch_size', type=int, default=None, help='batch size for evaluation (default: 256 on CPU, faster '
      'than 1000 there in every paired run, and 1000 on CUDA)')
    a('--json', action='store_true', help='print the final summary as one JSON object')


def _model(a):
    a('--arch', default=None, help=f'architecture when no meta says it (default WRN-16-1): {", ".join(MODELS)}')
    a('--num_class', type=int, default=None, help='number of classes (default: from the data set)')
    a('--image_size', type=int, default=None, help='image side in pixels; image folders are resized to it (default 32)')
    a('--normalize', default=None, help="input normalisation the model expects: 'cifar' (CIFAR mean/std), 'none' "
      "(raw [0,1]), or six numbers 'm1,m2,m3,s1,s2,s3' (default: the checkpoint's meta, else the recipe/data set)")


def _attack(a):
    a('--target_label', type=int, default=None, help='attack target class (default: meta, else 0)')
    a('--trigger_type', default=None, help=f'trigger (default: meta, else gridTrigger): {", ".join(TRIGGERS)}')
    a('--target_type', default=None, help=f'label rule (default: meta, else all2one): {", ".join(TARGET_TYPES)}')
    a('--inject_portion', type=float, default=None, help='poisoned fraction of the training set in [0, 1] (0: a clean control model) '
      '(cleanLabel: fraction of the target-class images); default 0.1')
    a('--trig_w', type=int, default=None, help='squareTrigger rows (default 3)')
    a('--trig_h', type=int, default=None, help='squareTrigger columns (default 3)')
    a('--trigger_path', default=None, help="additive pattern for trojanTrigger (required; the references' "
      'trigger/best_square_trigger_cifar10.npz), image for blendedTrigger (default: fixed noise)')


def _schedule(a):
    a('--epochs', type=int, default=10, help='training epochs')
    a('--lr', type=float, default=0.1, help='initial learning rate (the schedule is per script, see README)')


def _train(a):
    a('--batch_size', type=int, default=64, help='training batch size')
    a('--momentum', type=float, default=0.9, help='SGD momentum')
    a('--weight_decay', type=float, default=1e-4, help='SGD weight decay')
    a('--eval_every', type=int, default=1, help='evaluate on the test sets every k epochs (always after the last)')
    a('--eval_subset', type=int, default=2000, help='per-epoch rows score a fixed random N images of each test set '
      '(0 = all); the final model is always scored on all of them')
    a('--compile', action='store_true', help='torch.compile the model (CUDA; slow to start)')
    a('--log_root', default='./logs', help='per-run CSV logs are written under this folder')
    a('--checkpoint_root', default='./weight', help='models are read and written under this folder')
    a('--output', default=None, help='where the final model is written (default: per script)')
    a('--resume', action='store_true', help='continue an interrupted run from its <output>.resume file')


def _badnet(a):
    a('--recipe', default='mcl', choices=tuple(BADNET_RECIPES), help='reference training recipe (config.BADNET_RECIPES)')
    a('--no_augment', action='store_true', help='no random crop/flip even if the recipe has them')


def _defense(a):
    a('--s_model', default=None, help='model under defense (default: <checkpoint_root>/s_net/<arch>.tar)')
    a('--ratio', type=float, default=0.05, help='fraction of the training set the defense may use (clean), in (0, 1]')


def _teacher(a):
    a('--t_model', default=None, help='teacher model (default: <checkpoint_root>/t_net/<s_name>.tar; '
      'fine-tuned from --s_model first if the file does not exist)')
    a('--teacher_epochs', type=int, default=10, help='epochs of teacher fine-tuning (NAD README: 5-10)')
    a('--teacher_lr', type=float, default=0.1, help="initial lr of teacher fine-tuning (NAD's schedule: "
      '/10 from epoch 2)')
    a('--cutout', type=int, default=3, help='Cutout length of the distillation defenses\' augmentation (NAD/ARGD: '
      'Cutout(1, 3), a 2x2 hole); 0 = crop + flip only')


def _distill(a):
    a('--defense', default='argd', help=f'{", ".join(DEFENSES)} (the FT baseline is train_teacher.py)')
    a('--p', type=float, default=2.0, help='AT: power of |activation| in the attention map')
    a('--beta1', type=float, default=500, help='NAD: AT weight on group 1 (NAD config.py)')
    a('--beta2', type=float, default=1000, help='NAD: AT weight on group 2')
    a('--beta3', type=float, default=1000, help='NAD: AT weight on group 3')
    a('--vert_weights', default='2000,5000,2000', help='ARGD: vertex (AT) weights of groups 1,2,3')
    a('--w_vert', type=float, default=1.0, help='ARGD: weight of the vertex loss')
    a('--w_edge', type=float, default=1.0, help='ARGD: weight of the edge (relation graph) loss')
    a('--w_emb', type=float, default=1.0, help='ARGD: weight of the embedding (cross-layer attention) loss')
    a('--qk_dim', type=int, default=128, help='ARGD: query/key dimension of the embedding loss')
    a('--train_projections', action='store_true', help='ARGD: optimise the embedding loss\'s query/key projections '
      'with the student (the reference leaves them at their random initialisation)')


def _mcl(a):
    a('--mcl_target', default='auto', help="MCL: the target label MCL is told, or 'auto' to detect it (evaluation "
      'always scores against the true attack: the checkpoint\'s meta or --target_label)')
    a('--temperature', type=float, default=0.5, help='MCL: temperature of the contrastive logits')
    a('--inv_epochs', type=int, default=100, help='MCL: passes over the clean subset (--batch_size batches) of '
      'trigger inversion, as the reference counts its 100 steps')
    a('--inv_patience', type=int, default=0, help='MCL: stop inversion after this many passes without a smaller '
      'pattern (0 = never, as the reference)')
    a('--detect_epochs', type=int, default=10, help='MCL: inversion passes per class when detecting the target')
    a('--asr_bound', type=float, default=0.9, help='MCL: attack success a pattern must reach to count')
    a('--init_cost', type=float, default=1e-3, help='MCL: initial weight of the pattern-size penalty')
    a('--force', action='store_true', help='MCL: erase even when no target label is detected')


def _evaluate(a):
    a('--model', default=None, help='the checkpoint to evaluate')


def _benchmark(a):
    a('--batch_size', type=int, default=64, help='training batch size of the timed steps')
    a('--compile', action='store_true', help='torch.compile the model (CUDA; slow to start)')
    a('--checkpoint_root', default='./weight', help='--end_to_end: where the shipped models are')
    a('--end_to_end', action='store_true', help='also time FT, NAD, ARGD and MCL end to end on --data_root with the '
      'shipped model (minutes on a CPU)')


def _table(a):
    a('--attacks', default='badnet,blend,sig,sig-cl,wanet', help='rows of the table (badnet, blend, sig, sig-cl = '
      'clean-label SIG, wanet, trojan = needs --trojan_pattern)')
    a('--table_dir', default='./results', help='where table.csv, table.md, the cell files and the logs go')


def _table_run(a):
    a('--seeds', default='0', help='comma-separated seeds: a backdoored model and every defense per seed')
    a('--shard', default=None, help='K/N: run only the K-th (from 0) of N fixed slices of the cells (job arrays)')
    a('--workers', type=int, default=1, help='worker processes on this machine (one GPU each when there are several)')
    a('--epochs', type=int, default=None, help="backdoor training epochs (default: train_badnet.py's)")
    a('--checkpoint_root', default='./weight', help='backdoored models go to <checkpoint_root>/table/')
    a('--ratio', type=float, default=0.05, help='clean fraction given to the defenses')
    a('--trojan_pattern', default=None, help="the trojan row's additive pattern: the references' "
      'trigger/best_square_trigger_cifar10.npz (not shipped here)')


def _plot(a):
    a('--seed', type=int, default=0, help="which seed's logs to draw")


def _gallery(a):
    a('--image_size', type=int, default=None, help='image side in pixels (default 32)')
    a('--trigger_path', default=None, help='pattern file for trojanTrigger / blendedTrigger')
    a('--output', default=None, help='the PNG to write')


# The option groups each script reads.
SCRIPTS = {
    'train_badnet.py': (_run, _model, _attack, _schedule, _train, _badnet),
    'train_teacher.py': (_run, _model, _attack, _train, _defense, _teacher),
    'main-ARGD.py': (_run, _model, _attack, _schedule, _train, _defense, _teacher, _distill),
    'main_mcl.py': (_run, _model, _attack, _schedule, _train, _defense, _mcl),
    'evaluate.py': (_run, _model, _attack, _evaluate),
    'benchmark.py': (_run, _benchmark, _defense),
    'run_table.py': (_run, _table, _table_run),
    'show_triggers.py': (_run, _gallery),
    'plot_curves.py': (_table, _plot),
}


class UserError(Exception):
    """Bad input. Scripts print it as one line on stderr and exit with status 2."""


class _Help(argparse.HelpFormatter):
    """Shows each option's default, unless its help already says what the default is."""
    def _get_help_string(self, action):
        text = action.help or ''
        if 'default' not in text and action.option_strings and action.default not in (None, False, argparse.SUPPRESS):
            text += ' (default: %(default)s)'
        return text


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not argparse's usage block
        raise UserError(message)


def get_arguments(script, description=None):
    p = _Parser(prog=script, description=description,
                formatter_class=_Help)
    for group in SCRIPTS[script]:
        group(p.add_argument)
    p.set_defaults(**SCRIPT_DEFAULTS[script])
    return p


def parse_args(script, argv=None, description=None):
    args = get_arguments(script, description).parse_args(argv)
    check_args(args)
    return args


def check_args(args):
    """Reject what can be rejected before any data or model is touched (only the options this script has)."""
    has = lambda name: getattr(args, name, None) is not None
    choices = (('dataset', DATASETS, 'dataset'), ('arch', MODELS, 'model'), ('trigger_type', TRIGGERS, 'trigger'),
               ('target_type', TARGET_TYPES, 'target type'), ('defense', DEFENSES, 'defense'))
    for name, allowed, what in choices:
        if has(name) and getattr(args, name) not in allowed:
            raise UserError(f"unknown {what} '{getattr(args, name)}' (choose from {', '.join(allowed)})")
    if has('ratio') and not 0 < args.ratio <= 1:
        raise UserError(f'--ratio must be in (0, 1], got {args.ratio}')
    if has('inject_portion') and not 0 <= args.inject_portion <= 1:
        raise UserError(f'--inject_portion must be in [0, 1], got {args.inject_portion}')
    if has('num_class') and args.num_class < 2:
        raise UserError(f'--num_class must be at least 2, got {args.num_class}')
    if has('target_label') and args.target_label < 0:
        raise UserError(f'--target_label must be >= 0, got {args.target_label}')
    for name in ('epochs', 'teacher_epochs', 'eval_subset', 'inv_epochs', 'detect_epochs', 'inv_patience', 'cutout'):
        if has(name) and getattr(args, name) < 0:
            raise UserError(f'--{name} must be >= 0')
    for name in ('batch_size', 'eval_every', 'eval_batch_size', 'workers'):
        if has(name) and getattr(args, name) < 1:
            raise UserError(f'--{name} must be >= 1')
    if has('mcl_target') and args.mcl_target != 'auto' and not (args.mcl_target.isdigit()):
        raise UserError(f"--mcl_target must be 'auto' or a class index >= 0, got '{args.mcl_target}'")
    if has('vert_weights'):
        try:
            args.vert_weights = [float(v) for v in str(args.vert_weights).split(',')]
            assert len(args.vert_weights) == 3
        except (ValueError, AssertionError):
            raise UserError(f"--vert_weights needs three comma-separated numbers, got '{args.vert_weights}'")
    if has('normalize'):
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
