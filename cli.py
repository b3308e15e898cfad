"""Command lines: each script's options (their defaults come from config.py), validation before any
work starts, and the one-line error every bad input ends in."""
import argparse
import math
import sys

import config
import defenses
from data_loader import parse_normalize
from errors import UserError
from models import MODELS
from triggers import TRIGGERS

TARGET_TYPES = ('all2one', 'all2all', 'cleanLabel')


# ============================================================================ the options, by group
def _run(a):
    a('--dataset', help=f'data set: {", ".join(config.DATASETS)}')
    a('--data_root', help='the data set (downloaded here when absent), or an image-folder tree '
      '<root>/train/<class>/*, <root>/test/<class>/* (used offline, even for CIFAR10)')
    a('--seed', type=int, help='fixes data subsets, poisoned indices, augmentation and initialisation')
    a('--device', help="'cuda', 'cpu', ... (default: cuda when available, else cpu)")
    a('--threads', type=int, help='CPU threads for torch (default: torch chooses)')
    a('--precision', choices=('auto', 'fp32', 'bf16', 'fp16'), help='auto = what ran fastest: bf16 autocast on CPUs '
      'with AMX or AVX512-BF16, fp32 on TF32 tensor cores on GPUs of compute capability >= 8.0 (bf16 autocast was '
      'slower there), fp16 autocast with loss scaling on older GPUs with tensor cores (V100, T4), else fp32 '
      '(default: auto)')
    a('--deterministic', action='store_true', help="CUDA: cuDNN's deterministic kernels and torch's deterministic "
      'algorithms, so a run repeats bit for bit on one GPU (slower; the CPU is deterministic without it)')
    a('--eval_batch_size', type=int, help='evaluation batch size (default: 256 on CPU, 1000 on CUDA)')
    a('--cuda_graphs', choices=('off', 'on'), help="on: replay the model's fixed-shape fp32 calls (training steps, "
      'evaluation batches, MCL\'s inversion) as CUDA graphs, each captured on its first call; the CPU ignores it '
      '(not yet measured on a GPU, hence off)')
    a('--json', action='store_true', help='print the final summary as one JSON object')


def _model(a):
    a('--arch', help=f'architecture, where no checkpoint meta says it: {", ".join(MODELS)}')
    a('--num_class', type=int, help='number of classes (default: meta, else the data set\'s)')
    a('--image_size', type=int, help='image side in pixels; image folders are resized to it (default: meta, else 32)')
    a('--normalize', help="input normalisation the model expects: 'cifar' (CIFAR mean/std), 'none' (raw [0,1]), "
      "or 'm1,m2,m3,s1,s2,s3' (default: meta, else the recipe's, else the data set's)")


def _attack(a):
    a('--target_label', type=int, help='attack target class, where no meta says it')
    a('--trigger_type', help=f'trigger, where no meta says it: {", ".join(TRIGGERS)}')
    a('--target_type', help=f'label rule, where no meta says it: {", ".join(TARGET_TYPES)}')
    a('--inject_portion', type=float, help='poisoned fraction of the training set in [0, 1] (cleanLabel: of the '
      'target-class images; 0: a clean control model)')
    a('--trig_w', type=int, help="squareTrigger: the square's extent down the image, in rows (named as the "
      "references name it; their 'width' runs along the first image axis)")
    a('--trig_h', type=int, help="squareTrigger: the square's extent across the image, in columns")
    a('--trigger_path', help="trojanTrigger's pattern (required): an .npz added as the references add "
      "best_square_trigger_cifar10.npz, or an image stamped as MCL stamps trigger_gtsrb.png; blendedTrigger's "
      "image (default: a fixed noise image); refoolTrigger's reflections: another data set's image folder")


def _schedule(a):
    a('--epochs', type=int, help='training epochs')
    a('--lr', type=float, help='initial learning rate (the schedule is per script, see README)')


def _train(a):
    a('--batch_size', type=int, help='training batch size')
    a('--momentum', type=float, help='SGD momentum')
    a('--weight_decay', type=float, help='SGD weight decay')
    a('--eval_every', type=int, help='evaluate on the test sets every k epochs (always after the last)')
    a('--eval_subset', type=int, help='per-epoch rows score a fixed random N images of each test set (0 = all); '
      'the final model is always scored on all of them')
    a('--log_root', help='per-run CSV logs are written under this folder')
    a('--checkpoint_root', help='models are read and written under this folder')
    a('--output', help='where the final model is written (default: per script)')
    a('--resume', action='store_true', help='continue an interrupted run from its <output>.resume file')


def _badnet(a):
    a('--recipe', choices=tuple(config.BADNET_RECIPES), help='reference training recipe (config.BADNET_RECIPES)')
    a('--no_augment', action='store_true', help='no random crop/flip even if the recipe has them')
    a('--compile', choices=('auto', 'on', 'off'), help='torch.compile the model; auto: on the CPU where a C++ '
      'compiler is found, never on CUDA (measured slower there; on: where triton is found)')


def _defense(a):
    a('--s_model', help='model under defense (default: <checkpoint_root>/s_net/<arch>.tar)')
    a('--ratio', type=float, help='fraction of the training set the defense may use (clean), in (0, 1]')


def _choose(a):
    a('--defense', help='the defense (config.DEFENSES); `--defense KEY --help` shows the values it runs with')


def _teacher(a):
    a('--t_model', help='teacher model (default: <checkpoint_root>/t_net/<s_name>.tar; fine-tuned from --s_model '
      'first if the file does not exist)')
    a('--teacher_epochs', type=int, help='epochs of teacher fine-tuning')
    a('--teacher_lr', type=float, help="initial lr of teacher fine-tuning (/10 from epoch 2)")
    a('--cutout', type=int, help="Cutout length of the distillation defenses' augmentation (0 = crop + flip only)")


def _inversion(a):
    a('--mcl_target', help="MCL: the target label MCL is told, or 'auto' to detect it (evaluation always scores "
      "against the true attack: the checkpoint's meta or --target_label)")
    a('--inv_epochs', type=int, help='MCL: passes over the clean subset (--batch_size batches) of trigger inversion')
    a('--inv_patience', type=int, help='MCL: stop inversion after this many passes without a smaller pattern '
      '(0 = never, as the reference)')
    a('--detect_epochs', type=int, help='MCL: inversion passes per class when detecting the target')
    a('--asr_bound', type=float, help='MCL: attack success a pattern must reach to count')
    a('--init_cost', type=float, help='MCL: initial weight of the pattern-size penalty')
    a('--force', action='store_true', help='MCL: erase even when no target label is detected')


def _interpolate(a):
    a('--model', help='the defended checkpoint (the end of the path)')
    a('--from', dest='start', help='the backdoored checkpoint the defense started from (the start of the path)')
    a('--points', type=int, help='points on the path, both ends included')
    a('--eval_subset', type=int, help='score a fixed random N images of each test set at each point (0 = all)')


def _share(a):
    a('--adv_share', type=float, help='share of each batch replaced by PGD or synthesised-trigger images at their '
      'true labels')
    a('--source', help="the share's images: pgd (FT-AT, PAM: untargeted PGD per batch), inverted (MCL's "
      "detection's pattern, a synthesised trigger: the -SI variants), none (ARGD, NAD: no share)")


def _strip(a):
    a('--strip_n', type=int, help='STRIP: clean overlays superimposed on each input')
    a('--strip_frr', type=float, help="STRIP: false rejection rate the threshold is set at, on the defender's clean subset")
    a('--strip_images', type=int, help='STRIP: test images of each set scored, and defender images for the threshold')


def _attack_from(a):
    a('--attack_from', help="score against the attack in this checkpoint's meta instead of the model's own "
      '(a clean control under another model\'s trigger)')


def _evaluate(a):
    a('--model', help='the checkpoint to evaluate')


def _retune(a):
    a('--model', help='the checkpoint to re-tune')
    a('--ratio', type=float, help="the defender's clean fraction: the retuning images are drawn apart from it")
    a('--retune_ratio', type=float, help='fraction of the training set the retuning attack uses, in (0, 1]')
    a('--poisoned', type=int, help="how many of its images carry the model's trigger")


def _benchmark(a):
    a('--batch_size', type=int, help='training batch size of the timed steps')
    a('--compile', action='store_true', help='also time the train step under torch.compile')
    a('--checkpoint_root', help='--end_to_end: where the shipped models are')
    a('--end_to_end', action='store_true', help='also time every defense (the table\'s '
      'columns) end to end on --data_root with the shipped model (half an hour on a 2-core CPU)')


def _table_dir(a):
    a('--table_dir', help='where table.csv, table.md, the cell files and the logs go')


def _table_run(a):
    a('--attacks', help='rows of the table (see the README; trojan needs --trojan_pattern)')
    a('--defenses', help='columns of the table')
    a('--seeds', help='comma-separated defense seeds (clean subset, teacher, initialisation)')
    a('--model_seed', type=int, help="the backdoored models' seed; 0 uses <checkpoint_root>/zoo/<attack>.tar where "
      'it exists, else a model is trained once')
    a('--shard', help='K/N: run only the K-th (from 0) of N fixed slices of the cells (job arrays)')
    a('--workers', type=int, help='worker processes on this machine (one GPU each when there are several)')
    a('--epochs', type=int, help="backdoor training epochs (default: train_badnet.py's)")
    a('--checkpoint_root', help='the zoo is <checkpoint_root>/zoo/; models made here go to <checkpoint_root>/table/')
    a('--ratio', type=float, help='clean fraction given to the defenses')
    a('--skip_retune', action='store_true', help="don't run the retuning attack on each cell's model")
    a('--trojan_pattern', help="the trojan row's additive pattern: the references' "
      'trigger/best_square_trigger_cifar10.npz (not shipped here)')
    a('--refool_source', help="the refool row's reflections: another data set's image folder (GTSRB's for "
      "CIFAR-10, CIFAR-10's for GTSRB), where the row's model is trained here")


def _plot(a):
    a('--attacks', help='comma-separated attacks: one picture each')
    a('--seed', type=int, help="which seed's logs to draw")
    a('--robustness', action='store_true', help='draw <table_dir>/robustness.png from table.csv instead')
    a('--dataset', help='the data set whose cells to draw (default: each in table.csv, a picture each)')


def _gallery(a):
    a('--image_size', type=int, help='image side in pixels (default 32)')
    a('--trigger_path', help="trojanTrigger's additive pattern (default: a demo square)")
    a('--output', help='the PNG to write')


# The option groups each script reads, and the config.py groups their defaults come from. A defense script
# also reads the options its defenses' modules declare (options(add) in defenses/), their defaults completed
# by the chosen defense's entry in config.DEFENSES (see script_defaults).
C = config
DEFENDING = (C.COMMON, C.MODEL, C.ATTACK, C.TRAINING, C.DEFENSE)
SCRIPTS = {
    'train_badnet.py': ((_run, _model, _attack, _schedule, _train, _badnet),
                        (C.COMMON, C.MODEL, C.ATTACK, C.TRAINING, C.TRAIN_BADNET)),
    'train_teacher.py': ((_run, _model, _attack, _train, _defense, _teacher), (*DEFENDING, C.TEACHER)),
    'main-ARGD.py': ((_run, _model, _attack, _schedule, _train, _defense, _choose, _teacher, _share),
                     (*DEFENDING, C.TEACHER)),
    'main_mcl.py': ((_run, _model, _attack, _schedule, _train, _defense, _choose, _inversion),
                    (*DEFENDING, C.INVERSION)),
    'main_ft.py': ((_run, _model, _attack, _schedule, _train, _defense, _choose, _share), DEFENDING),
    'main_strip.py': ((_run, _model, _attack, _defense, _strip), (C.COMMON, C.MODEL, C.ATTACK, C.DEFENSE, C.STRIP)),
    'evaluate.py': ((_run, _model, _attack, _evaluate, _attack_from), (C.COMMON, C.MODEL, C.ATTACK, C.EVALUATE,
                                                                      C.ATTACK_FROM)),
    'retune.py': ((_run, _model, _attack, _schedule, _train, _retune, _attack_from),
                  (C.COMMON, C.MODEL, C.ATTACK, C.TRAINING, C.DEFENSE, C.RETUNE, C.ATTACK_FROM)),
    'benchmark.py': ((_run, _benchmark, _defense), (C.COMMON, C.TRAINING, C.DEFENSE, C.BENCHMARK)),
    'run_table.py': ((_run, _table_dir, _table_run), (C.COMMON, C.TRAINING, C.DEFENSE, C.TABLE, C.RUN_TABLE)),
    'interpolate.py': ((_run, _model, _attack, _interpolate), (C.COMMON, C.MODEL, C.ATTACK, C.INTERPOLATE)),
    'show_triggers.py': ((_run, _gallery), (C.COMMON, C.MODEL, C.ATTACK, C.SHOW_TRIGGERS)),
    'plot_curves.py': ((_table_dir, _plot), (C.TABLE, C.PLOT_CURVES)),
}
TEACHER_OPTIONS = ('teacher_epochs', 'teacher_lr')  # main-ARGD.py's teacher is FT: its numbers are DEFENSES['ft']'s


def defenses_of(script):
    """The registered defenses a script runs (its --defense choices), its default first."""
    keys = [k for k, d in config.DEFENSES.items() if d['script'] == script]
    return sorted(keys, key=lambda k: k != config.DEFAULT_DEFENSE[script])


# ============================================================================ parsing
class _Help(argparse.HelpFormatter):
    """Shows each option's default, unless its help already says what the default is."""
    def _get_help_string(self, action):
        text = action.help or ''
        # identity, not ==: a default of 0 is shown, only None and False (a flag) are not
        if 'default' not in text and action.option_strings and not any(action.default is v for v in
                                                                       (None, False, argparse.SUPPRESS)):
            text += ' (default: %(default)s)'
        return text


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not argparse's usage block
        raise UserError(message)


def script_defaults(script, defense=None):
    """The script's defaults: its config.py groups merged (no option may be in two of them); for a defense
    script, then the chosen defense's entry (config.DEFENSES: its recipe wins over the groups), and the
    teacher's numbers from FT's. Returns (defaults, the defense or None, the options only some of the
    script's defenses have)."""
    merged = {}
    for group in SCRIPTS[script][1]:
        twice = set(merged) & set(group)
        if twice:
            raise AssertionError(f'{script}: {sorted(twice)} set in two config.py groups')
        merged.update(group)
    if script not in config.DEFAULT_DEFENSE:
        return merged, None, set()
    defense = defense or config.DEFAULT_DEFENSE[script]
    merged.update({k: config.DEFENSES['ft'][k] for k in TEACHER_OPTIONS})
    merged.update(config.DEFENSES[defense])
    own = set().union(*(config.DEFENSES[k] for k in defenses_of(script))) - set(config.DEFENSES[defense])
    return dict(merged, defense=defense), defense, own


def get_arguments(script, description=None, defense=None):
    defaults, defense, own = script_defaults(script, defense)
    p = _Parser(prog=script, description=description, formatter_class=_Help, allow_abbrev=False)
    p.minimums = {}  # option -> its least value (checked by check_args)

    def add(flag, minimum=None, **kw):  # every option's default is config.py's, read when the parser is built
        name = kw.get('dest', flag[2:])
        if flag in p._option_string_actions:
            return  # declared by another of the script's defenses too
        if minimum is not None:
            p.minimums[name] = minimum
        if name == 'defense':
            kw['choices'] = defenses_of(script)
        elif name in own:  # another defense's option: the chosen one runs without it
            kw['help'] += f' (not used by {defense})'
        elif defense and config.DEFENSES[defense].get(name) is not None:  # None: the help says what it means
            kw['help'] += f' (default for {defense}: %(default)s)'
        p.add_argument(flag, default=None if name in own else defaults[name], **kw)
    for group in SCRIPTS[script][0]:
        group(add)
    for key in defenses_of(script) if defense else ():  # the options the script's defenses declare
        options = getattr(defenses.module(key), 'options', None)
        if options:
            options(add)
    return p


def chosen_defense(script, argv):
    """The --defense of a command line (its defaults depend on it), checked before the parser is built."""
    if script not in config.DEFAULT_DEFENSE:
        return None
    chosen = None
    for i, token in enumerate(argv):
        if token == '--defense' and i + 1 < len(argv):
            chosen = argv[i + 1]
        elif token.startswith('--defense='):
            chosen = token.split('=', 1)[1]
    if chosen is not None and chosen not in defenses_of(script):
        raise UserError(f"unknown defense '{chosen}' (choose from {', '.join(defenses_of(script))})")
    return chosen


def parse_args(script, argv=None, description=None):
    """Parse and validate; args.given is the set of options given on the command line (a flag beats
    a checkpoint's meta, which beats config.py)."""
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    parser = get_arguments(script, description, chosen_defense(script, argv))
    args = parser.parse_args(argv)
    actions = parser._option_string_actions
    args.given = {actions[t.split('=')[0]].dest for t in argv if t.startswith('--') and t.split('=')[0] in actions}
    check_args(args, script, parser.minimums)
    return args


def check_args(args, script=None, minimums=None):
    """Reject what can be rejected before any data or model is touched (only the options this script has);
    minimums: the least value of options the defenses declare (a float: finite and at least it)."""
    has = lambda name: getattr(args, name, None) is not None
    defenses = defenses_of(script) if script in config.DEFAULT_DEFENSE else ()
    sources = {config.DEFENSES[d].get('source') for d in defenses} - {None}
    choices = (('dataset', config.DATASETS, 'dataset'), ('arch', MODELS, 'model'), ('trigger_type', TRIGGERS, 'trigger'),
               ('target_type', TARGET_TYPES, 'target type'), ('defense', defenses, 'defense'),
               ('source', sorted(sources), 'source'))
    for name, allowed, what in choices:
        if has(name) and getattr(args, name) not in allowed:
            raise UserError(f"unknown {what} '{getattr(args, name)}' (choose from {', '.join(allowed)})")
    if has('adv_share') and not 0 <= args.adv_share <= 1:
        raise UserError(f'--adv_share must be in [0, 1], got {args.adv_share}')
    for name, least in dict(minimums or {}, lr=0).items():
        value = getattr(args, name, None)
        if value is None or (value >= least and math.isfinite(value)):
            continue
        raise UserError(f'--{name} must be >= {least}, got {value}' if isinstance(value, int) else
                        f'--{name} must be a finite number >= {least}, got {value}')
    if has('retune_ratio') and not 0 < args.retune_ratio <= 1:
        raise UserError(f'--retune_ratio must be in (0, 1], got {args.retune_ratio}')
    if has('poisoned') and args.poisoned < 0:
        raise UserError(f'--poisoned must be >= 0, got {args.poisoned}')
    if has('ratio') and not 0 < args.ratio <= 1:
        raise UserError(f'--ratio must be in (0, 1], got {args.ratio}')
    if has('inject_portion') and not 0 <= args.inject_portion <= 1:
        raise UserError(f'--inject_portion must be in [0, 1], got {args.inject_portion}')
    if has('num_class') and args.num_class < 2:
        raise UserError(f'--num_class must be at least 2, got {args.num_class}')
    if has('target_label') and args.target_label < 0:
        raise UserError(f'--target_label must be >= 0, got {args.target_label}')
    for name in ('epochs', 'teacher_epochs', 'eval_subset', 'inv_patience', 'cutout'):
        if has(name) and getattr(args, name) < 0:
            raise UserError(f'--{name} must be >= 0')
    # a trigger inversion needs at least one pass (--epochs 0 is MCL's detection-only run)
    if has('points') and args.points < 2:
        raise UserError(f'--points must be >= 2 (both ends of the path), got {args.points}')
    if has('strip_frr') and not 0 < args.strip_frr < 1:
        raise UserError(f'--strip_frr must be in (0, 1), got {args.strip_frr}')
    for name in ('batch_size', 'eval_every', 'eval_batch_size', 'workers', 'inv_epochs', 'detect_epochs', 'strip_n',
                 'strip_images'):
        if has(name) and getattr(args, name) < 1:
            raise UserError(f'--{name} must be >= 1, got {getattr(args, name)}')
    if has('mcl_target') and args.mcl_target != 'auto' and not args.mcl_target.isdigit():
        raise UserError(f"--mcl_target must be 'auto' or a class index >= 0, got '{args.mcl_target}'")
    if has('mcr_t') and args.mcr_t != 'auto' and not _unit_number(args.mcr_t):
        raise UserError(f"--mcr_t must be 'auto' or a number in [0, 1], got '{args.mcr_t}'")
    if has('vert_weights'):
        try:
            args.vert_weights = [float(v) for v in str(args.vert_weights).split(',')]
            assert len(args.vert_weights) == 3
        except (ValueError, AssertionError):
            raise UserError(f"--vert_weights needs three comma-separated numbers, got '{args.vert_weights}'")
    if has('normalize'):
        parse_normalize(args.normalize)


def _unit_number(text):
    try:
        return 0 <= float(text) <= 1
    except ValueError:
        return False


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
