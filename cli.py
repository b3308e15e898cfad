"""Command lines: each script's options (their defaults come from config.py), validation before any
work starts, and the one-line error every bad input ends in."""
import argparse
import math
import sys

import config
from batching import parse_normalize
from defenses import registry, unknown
from errors import UserError
from models import MODELS
from options import (TARGET_TYPES, attack, attack_from, badnet, benchmark, choose, defense, evaluate, gallery,
                     interpolate, model, plot, retune, run, schedule, table_dir, table_run, train)
from triggers import TRIGGERS


# The option groups each script reads, and the config.py groups their defaults come from. A defense script
# (config.DEFAULT_DEFENSE names them) also reads the options its chosen defense's module declares
# (options(add) in defenses/), their defaults its entry in config.DEFENSES (see script_defaults).
C = config
DEFENDING = ((run, model, attack, defense, choose),  # a defense that trains reads options.recipe too (with train)
             (C.COMMON, C.MODEL, C.ATTACK, C.TRAINING, C.DEFENSE, C.TEACHER, C.INVERSION))
SCRIPTS = {
    'train_badnet.py': ((run, model, attack, schedule, train, badnet),
                        (C.COMMON, C.MODEL, C.ATTACK, C.TRAINING, C.TRAIN_BADNET)),
    'train_teacher.py': DEFENDING,
    'main-ARGD.py': DEFENDING,
    'main_mcl.py': DEFENDING,
    'main_ft.py': DEFENDING,
    'main_strip.py': DEFENDING,
    'evaluate.py': ((run, model, attack, evaluate, attack_from), (C.COMMON, C.MODEL, C.ATTACK, C.EVALUATE,
                                                                 C.ATTACK_FROM)),
    'retune.py': ((run, model, attack, schedule, train, retune, attack_from),
                  (C.COMMON, C.MODEL, C.ATTACK, C.TRAINING, C.DEFENSE, C.RETUNE, C.ATTACK_FROM)),
    'benchmark.py': ((run, benchmark, defense), (C.COMMON, C.TRAINING, C.DEFENSE, C.BENCHMARK)),
    'run_table.py': ((run, table_dir, table_run), (C.COMMON, C.TRAINING, C.DEFENSE, C.TABLE, C.RUN_TABLE)),
    'interpolate.py': ((run, model, attack, interpolate), (C.COMMON, C.MODEL, C.ATTACK, C.INTERPOLATE)),
    'show_triggers.py': ((run, gallery), (C.COMMON, C.MODEL, C.ATTACK, C.SHOW_TRIGGERS)),
    'plot_curves.py': ((table_dir, plot), (C.TABLE, C.PLOT_CURVES)),
}
# the teacher's epochs and lr (options.teacher) are the numbers of the defense whose model is the teacher
TEACHER_OPTIONS = ('teacher_epochs', 'teacher_lr')


def defenses_of(script):
    """The registered defenses a defense script runs (its --defense choices: every one), its default first."""
    return sorted(registry(), key=lambda k: k != config.DEFAULT_DEFENSE[script])


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
    script, then the teacher's numbers and the chosen defense's entry (config.DEFENSES: its recipe wins over
    the groups). Returns (defaults, the defense or None)."""
    merged = {}
    for group in SCRIPTS[script][1]:
        twice = set(merged) & set(group)
        if twice:
            raise AssertionError(f'{script}: {sorted(twice)} set in two config.py groups')
        merged.update(group)
    if script not in config.DEFAULT_DEFENSE:
        return merged, None
    defense = defense or config.DEFAULT_DEFENSE[script]
    merged.update({k: config.DEFENSES[config.TEACHER_KEY][k] for k in TEACHER_OPTIONS})
    merged.update(config.DEFENSES[defense])
    return dict(merged, defense=defense), defense


def get_arguments(script, description=None, defense=None):
    defaults, defense = script_defaults(script, defense)
    p = _Parser(prog=script, description=description, formatter_class=_Help, allow_abbrev=False)
    p.minimums = {}  # option -> its least value (checked by check_args)

    def add(flag, minimum=None, **kw):  # every option's default is config.py's, read when the parser is built
        name = kw.get('dest', flag[2:])
        if minimum is not None:
            p.minimums[name] = minimum
        if name == 'defense':
            kw['choices'] = defenses_of(script)
        elif defense and config.DEFENSES[defense].get(name) is not None:  # None: the help says what it means
            kw['help'] += f' (default for {defense}: %(default)s)'
        p.add_argument(flag, default=defaults[name], **kw)
    for group in SCRIPTS[script][0]:
        group(add)
    if defense:  # the options the chosen defense's module declares
        registry()[defense].module.options(add)
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
    if chosen is not None and chosen not in registry():
        raise unknown(chosen)
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
    if getattr(args, 'defense', None):  # the chosen defense's own checks
        getattr(registry()[args.defense].module, 'check', lambda a: None)(args)
    return args


def check_args(args, script=None, minimums=None):
    """Reject what can be rejected before any data or model is touched (only the options this script has);
    minimums: the least value of options the defenses declare (a float: finite and at least it)."""
    has = lambda name: getattr(args, name, None) is not None
    defenses = defenses_of(script) if script in config.DEFAULT_DEFENSE else ()
    sources = {entry.get('source') for entry in config.DEFENSES.values()} - {None}
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
    for name in ('epochs', 'teacher_epochs', 'eval_subset'):
        if has(name) and getattr(args, name) < 0:
            raise UserError(f'--{name} must be >= 0')
    if has('points') and args.points < 2:
        raise UserError(f'--points must be >= 2 (both ends of the path), got {args.points}')
    for name in ('batch_size', 'eval_every', 'eval_batch_size', 'workers'):
        if has(name) and getattr(args, name) < 1:
            raise UserError(f'--{name} must be >= 1, got {getattr(args, name)}')
    if has('normalize'):
        parse_normalize(args.normalize)


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
