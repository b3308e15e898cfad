"""The results table: its rows (attacks), its columns (the undefended model, every defense of
config.DEFENSES, the clean control), and how one cell is run: the project's own scripts in subprocesses,
exactly as a user runs them.

Read by run_table.py, benchmark.py --end_to_end, plot_curves.py and the tests.
"""
import contextlib
import fcntl
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time

from types import SimpleNamespace

import config
from cli import get_arguments
from decoding import data_fingerprint
from defenses import registry, tag_of
from errors import UserError
from files import atomic_write_bytes, content_hash
from training import NOT_RESULT

HERE = os.path.dirname(os.path.abspath(__file__))

# row -> train_badnet.py flags (all2one, target 0); trojan adds --trigger_path <--trojan_pattern>, refool
# --trigger_path <--refool_source>
ATTACKS = {
    'badnet': ['--trigger_type', 'gridTrigger'],
    'blended': ['--trigger_type', 'blendedTrigger'],          # whole image, alpha 0.2 (Chen et al.)
    'blend': ['--trigger_type', 'blendTrigger'],              # MCL's 3x3 patch blended at 0.2
    'sig': ['--trigger_type', 'signalTrigger'],               # poisoned labels, as the references run it
    'sig-cl': ['--trigger_type', 'signalTrigger', '--target_type', 'cleanLabel', '--inject_portion', 0.8],
    'wanet': ['--trigger_type', 'wanetTrigger'],              # per batch, with noise mode
    'trojan': ['--trigger_type', 'trojanTrigger'],
    # label-consistent (Turner et al.): PGD images of half the target class (the PyTorch reference's poison_ratio)
    'lc': ['--trigger_type', 'lcTrigger', '--target_type', 'cleanLabel', '--inject_portion', 0.5],
    # Refool (Liu et al.): reflections of another data set's images (--refool_source) in every target-class image
    # (40% left the zoo's CIFAR-10 model at ASR 3.95 after 19 of 40 epochs; 100%: 10.51)
    'refool': ['--trigger_type', 'refoolTrigger', '--target_type', 'cleanLabel', '--inject_portion', 1.0],
    'clean': ['--trigger_type', 'gridTrigger', '--inject_portion', 0],  # the control: no poison, scored on BadNets
}
TOLD = object()  # in a column's flags: the row's target class (row_target)
DEFENDER = 'main_ft.py'  # the script that runs every registered defense (defenses/driver.py)
# column -> the script that runs it, its flags beyond the common ones, the CSV prefix of its per-epoch log (None: no
# training), its label, what the run needs, and the finding that is the test ASR along its own path (a list named
# *_ASR: MCR's curve); the defenses' from their modules' declarations (defenses.registry) and config.DEFENSES
COLUMNS = {
    'none': dict(script='evaluate.py', flags=[], log=None, label='none', needs=(), curve=None),
    **{key: dict(script=DEFENDER, flags=['--defense', key, *([spec.told, TOLD] if spec.told else [])],
                 log=tag_of(key, SimpleNamespace(**config.DEFENSES[key])), label=spec.label, needs=spec.needs,
                 curve=next((f for f in spec.findings if f.endswith('_ASR')), None))
       for key, spec in registry().items() if not spec.filter},  # a run-time filter (STRIP) has its own table
    # not a defense: the never-poisoned control (the clean row's model) scored and re-tuned under this
    # row's trigger, the floor a real erasure reaches (ASR, ASR and RA after re-tuning)
    'floor': dict(script='evaluate.py', flags=[], log=None, label='clean control', needs=(), curve=None),
}
# told neither the trigger nor the target (the MCL columns are told the target)
BLIND = tuple(key for key in COLUMNS if key in registry() and not registry()[key].told)
# options a cell's commands set from the table's own (common_flags, cell_commands): not the defense's recipe
PER_CELL = ('data_root', 'dataset', 'seed', 'precision', 'deterministic', 's_model', 'ratio', 't_model', 'defense',
            *{spec.told[2:] for spec in registry().values() if spec.told}, 'model', 'start', 'attack_from', 'arch',
            'num_class', 'image_size', 'normalize', 'target_label', 'trigger_type', 'target_type', 'inject_portion',
            'trig_w', 'trig_h', 'trigger_path')


def resolved_options(script, defense=None):
    """The values a script runs with from config.py (the chosen defense's entry, its groups), but those the
    table sets per cell and those that change nothing a cell records (--eval_subset does: the paths' ASR)."""
    parser = get_arguments(script, defense=defense)
    unrecorded = set(NOT_RESULT) - {'eval_subset'}
    return {a.dest: (list(a.default) if isinstance(a.default, tuple) else a.default) for a in parser._actions
            if a.option_strings and a.dest not in ('help', *unrecorded, *PER_CELL)}


def column_recipe(column):
    """Everything a column's cells run with besides the row's settings and the seed: the defense's resolved
    recipe (its config.DEFENSES entry through its options), the teacher's where it needs one, and the
    retuning attack's and the path's numbers every cell ends with. A cell's file and work are keyed by its
    hash (recipe_key), so an edit of config.py makes new cells, never serves the old ones."""
    recipe = dict(retune=resolved_options('retune.py'), interpolate=resolved_options('interpolate.py'))
    if column in registry():
        recipe['defense'] = resolved_options(DEFENDER, column)
    if {'teacher', 'end'} & set(COLUMNS[column]['needs']):  # FT's model, or FT's recipe run by the defense
        recipe['teacher'] = resolved_options(DEFENDER, config.TEACHER_KEY)
    return recipe


def run(script, *flags, watch=None):
    """Run a project script, return (its JSON summary, wall seconds); a failure stops this worker. Each line
    it prints goes to watch(line) while it runs (run_table.py's bar shows the latest)."""
    t0 = time.time()
    with tempfile.TemporaryFile('w+') as err:  # a file, not a pipe: a full stderr pipe would block the script
        p = subprocess.Popen([sys.executable, os.path.join(HERE, script), *map(str, flags), '--json'],
                             stdout=subprocess.PIPE, stderr=err, text=True)
        lines = []
        for line in p.stdout:
            lines.append(line.rstrip('\n'))
            if watch:
                watch(f'{script}: {lines[-1]}')
        p.wait()
        err.seek(0)
        stderr = err.read()
    if p.returncode != 0:
        raise UserError(f'{script} {" ".join(map(str, flags))} failed: {stderr.strip().splitlines()[-1:]}')
    return json.loads(lines[-1]), round(time.time() - t0, 1)


@contextlib.contextmanager
def locked(path, wait):
    """An exclusive POSIX lock on path (kept by this process until the block ends, dropped by the OS
    if it dies; POSIX locks also work across NFS clients). Yields False if another holds it and
    wait is False."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, 'a') as f:
        try:
            fcntl.lockf(f, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.lockf(f, fcntl.LOCK_UN)


def built_once(path, script, *flags, watch=None):
    """Make the model `path` with `script` unless it exists, and keep the run's summary and wall time
    in <path>.json. Whoever needs it first builds it; the others wait for its lock, then find it."""
    with locked(path + '.lock', wait=True):
        if not os.path.exists(path):
            metrics, seconds = run(script, *flags, '--output', path, watch=watch)
            atomic_write_bytes(json.dumps(dict(metrics, seconds=seconds)).encode(), path + '.json')


def short_hash(settings):
    return hashlib.sha1(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:8]


def zoo_model(args, attack):
    """The zoo's model of this row (<checkpoint_root>/<the data set's zoo folder>/<attack>.tar, trained with
    seed 0: config.DATASETS), if any."""
    path = os.path.join(args.checkpoint_root, config.DATASETS[args.dataset]['zoo'], f'{attack}.tar')
    return path if args.model_seed == 0 and os.path.exists(path) else None


def row_target(args, attack):
    """A row's target class: 0, or for a clean-label row the data set's (config.DATASETS: on GTSRB the
    largest class, as clean-label poisoning can only use the target class's own images)."""
    return config.DATASETS[args.dataset]['clean_label_target'] if 'cleanLabel' in ATTACKS[attack] else 0


def file_identity(path):
    """A file as what it is, not where it lies: its name and content hash."""
    return f'{os.path.basename(path)}:{content_hash(path)}'


def data_identity(args):
    """The data set as what it is: its name and a hash of its image-folder fingerprint (class folders and
    file counts; 'torchvision' for a downloaded set), not the folder it was read from."""
    return f"{args.dataset}:{data_fingerprint_hash(args.data_root)}"


def dataset_of(settings):
    """The data set's name in a cell's settings (its 'data' is data_identity's)."""
    return settings['data'].split(':')[0]


def model_settings(args, attack):
    """Everything that decides the backdoored model of a row: the zoo file's content, or how it is trained."""
    zoo = zoo_model(args, attack)
    if zoo:
        return dict(attack=attack, zoo=file_identity(zoo).split(':')[1])
    return dict(attack=attack, data=data_identity(args), epochs=args.epochs, model_seed=args.model_seed,
                trojan_pattern=file_identity(args.trojan_pattern) if attack == 'trojan' else None,
                **({'refool_source': data_fingerprint_hash(args.refool_source)} if attack == 'refool' else {}))


def data_fingerprint_hash(root):
    """An image folder as what it is (its class folders and file counts), not where it lies."""
    return hashlib.sha1(data_fingerprint(root).encode()).hexdigest()[:12]


def cell_settings(args, attack):
    """Everything that decides a cell's result besides its defense and defense seed. A row trained here
    counts by its content too (built first if absent): a retrain under other code or another float order
    is another model, and its cells never join the old one's."""
    model = model_settings(args, attack)
    if 'zoo' not in model:
        path, build = row_model(args, attack)
        build()
        model['model'] = content_hash(path)
    # precision only where not the default, so the cells run before it was passed on keep their keys
    return dict(model, data=data_identity(args), ratio=args.ratio,
                **({'precision': args.precision} if args.precision != 'auto' else {}),
                **({'deterministic': True} if args.deterministic else {}))


def common_flags(args, seed):
    """The options every cell's script gets from the caller's own."""
    flags = ['--data_root', args.data_root, '--dataset', args.dataset, '--seed', seed]
    flags += ['--device', args.device] if args.device else []
    flags += ['--threads', args.threads] if args.threads else []
    flags += ['--precision', args.precision]
    flags += ['--eval_batch_size', args.eval_batch_size] if args.eval_batch_size else []
    flags += ['--deterministic'] if args.deterministic else []
    flags += ['--cuda_graphs', 'on'] if args.cuda_graphs == 'on' else []  # not a result option: cell keys stay
    return flags


def row_model(args, attack, watch=None):
    """(path, build) of a row's backdoored model: the zoo's, used as it is, or one trained here once
    with --model_seed in <checkpoint_root>/table/<hash of its settings>/ (build() makes it if absent)."""
    zoo = zoo_model(args, attack)
    if zoo:
        return zoo, lambda: None
    path = os.path.join(args.checkpoint_root, 'table', short_hash(model_settings(args, attack)), f'{attack}.tar')
    flags = [*common_flags(args, args.model_seed), '--log_root', os.path.dirname(path), *ATTACKS[attack],
             '--target_label', row_target(args, attack),
             *(['--trigger_path', args.trojan_pattern] if attack == 'trojan' else []),
             *(['--trigger_path', args.refool_source] if attack == 'refool' else []),
             *(['--epochs', args.epochs] if args.epochs is not None else [])]
    return path, lambda: built_once(path, 'train_badnet.py', *flags, watch=watch)


def cell_commands(args, attack, seed, work, log_root, given_model=None, names=tuple(COLUMNS), watch=None):
    """-> {defense: function returning (metrics, seconds)} for the cells `names` of one (attack, defense
    seed): on given_model, else the zoo's model, else one trained here with --model_seed (built when first
    needed, in <checkpoint_root>/table/<hash of its settings>/). Outputs go to `work`. The clean control's
    model is looked up only where the floor is asked for."""
    common = common_flags(args, seed)
    go = lambda script, *flags: run(script, *flags, watch=watch)
    trains = [*common, '--log_root', log_root]  # the scripts that train write a CSV per run
    path, model = (given_model, lambda: None) if given_model else row_model(args, attack, watch)
    s_model = ['--s_model', path, '--ratio', args.ratio, *trains]
    teaching = config.TEACHER_KEY  # the defense whose model is the others' teacher: its cell is the teacher's run
    output = lambda name: os.path.join(work, f'{attack}-{name}-{short_hash(column_recipe(name))}.tar')  # per recipe
    teacher = output(teaching)

    def model_and_teacher():
        model()
        built_once(teacher, DEFENDER, *s_model, '--defense', teaching, watch=watch)

    def teacher_cell():  # the teacher's own training run; a teacher placed by hand is only scored
        model_and_teacher()
        if not os.path.exists(teacher + '.json'):
            return go('evaluate.py', '--model', teacher, *common)
        with open(teacher + '.json') as f:
            rec = json.load(f)
        return {k: v for k, v in rec.items() if k != 'seconds'}, rec['seconds']

    def defended(name):
        d = COLUMNS[name]
        told = [row_target(args, attack) if f is TOLD else f for f in d['flags']]  # MCL is told the row's target
        flags = [*s_model, *told, '--output', output(name)]
        uses_teacher = 'teacher' in d['needs']  # ARGD, NAD
        flags += ['--t_model', teacher] if uses_teacher else []
        build = model_and_teacher if uses_teacher else model

        def cell():
            build()
            return go(d['script'], *flags)
        return cell

    def undefended():
        model()
        return go('evaluate.py', '--model', path, *common)

    clean_path, clean_model = row_model(args, 'clean', watch) if 'floor' in names else (None, None)
    under_row = ['--attack_from', path]  # the clean control, scored and re-tuned under this row's attack

    def floor():
        model()
        clean_model()
        return go('evaluate.py', '--model', clean_path, *common, *under_row)

    def retuned(cell, model_path, attack_flags=()):
        """The cell, then the retuning attack on the model it ended with (unless skipped), and for a defended
        model the ASR along the straight line from the backdoored weights to its own."""
        def with_retune():
            metrics, seconds = cell()
            if getattr(args, 'skip_retune', True):
                return metrics, seconds
            r, more = go('retune.py', '--model', model_path, *common, '--ratio', args.ratio, '--log_root', log_root,
                          *attack_flags)
            metrics = dict(metrics, ASR_retuned=r['ASR'], ACC_retuned=r['ACC'], RA_retuned=r['RA'])
            if model_path not in (path, clean_path):
                p, t = go('interpolate.py', '--model', model_path, '--from', path, *common)
                metrics['path_ASR'], more = [point['ASR'] for point in p['path']], more + t
            return metrics, seconds + more
        return with_retune

    cells = {'none': (undefended, path), teaching: (teacher_cell, teacher), 'floor': (floor, clean_path, under_row)}
    return {name: retuned(*(cells.get(name) or (defended(name), output(name)))) for name in names}
