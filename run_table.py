"""The results table: attacks x defenses x seeds, each cell run once by any number of workers.

    python run_table.py --data_root /tmp/data/cifar10                           # every attack, seed 0
    python run_table.py --data_root /tmp/data/cifar10 --attacks badnet --seeds 0,1,2
    python run_table.py --data_root /tmp/data/cifar10 --seeds 0,1,2 --workers 4   # 4 processes here
    python run_table.py --data_root /data/cifar10 --seeds 0,1,2 --shard $SLURM_ARRAY_TASK_ID/8
    python run_table.py --data_root /tmp/data/cifar10 --attacks trojan --trojan_pattern best_square_trigger_cifar10.npz

A cell is (attack, defense, seed): the project's own script in a subprocess, on the backdoored
model of (attack, seed). Its result lands in <table_dir>/cells/<attack>-<defense>-s<seed>.json
when it finishes, and table.csv (one row per cell) and table.md (mean +- std over the seeds, and
n) are rebuilt from those files under a lock, so concurrent writers never lose a row. A worker
holds a lock on a cell while it runs it; the operating system drops the lock if the worker
dies, so workers on one machine or on many sharing a file system run each cell once, and a
killed worker's cell is redone by the next run. A backdoored model (and each FT teacher) is
built once per (attack, seed), under its own lock, by whichever worker needs it first.
--shard K/N runs the fixed K-th of N slices of the cells (K from 0); --workers N starts N
worker processes here, each on its own GPU when there are several.
"""
import contextlib
import fcntl
import json
import os
import statistics
import subprocess
import sys
import time

from config import UserError, main_guard, parse_args
from utils import atomic_write_bytes, write_csv

ATTACKS = {'badnet': ['--trigger_type', 'gridTrigger'], 'blend': ['--trigger_type', 'blendTrigger'],
           'sig': ['--trigger_type', 'signalTrigger'], 'wanet': ['--trigger_type', 'wanetTrigger'],
           'sig-cl': ['--trigger_type', 'signalTrigger', '--target_type', 'cleanLabel', '--inject_portion', 0.8],
           'trojan': ['--trigger_type', 'trojanTrigger']}  # + --trigger_path <--trojan_pattern>
DEFENSES = ('none', 'ft', 'nad', 'argd', 'mcl')
METRICS = ('ACC', 'ACC_all', 'ASR', 'RA')
HERE = os.path.dirname(os.path.abspath(__file__))


def run(script, *flags):
    """Run a project script, return (its JSON summary, wall seconds); a failure stops this worker."""
    t0 = time.time()
    r = subprocess.run([sys.executable, os.path.join(HERE, script), *map(str, flags), '--json'], capture_output=True,
                       text=True)
    if r.returncode != 0:
        raise UserError(f'{script} {" ".join(map(str, flags))} failed: {r.stderr.strip().splitlines()[-1:]}')
    return json.loads(r.stdout.strip().splitlines()[-1]), round(time.time() - t0, 1)


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


def built_once(path, script, flags):
    """Make the model `path` with `script` unless it exists, and keep the run's summary and wall time
    in <path>.json. Whoever needs it first builds it; the others wait for its lock, then find it."""
    with locked(path + '.lock', wait=True):
        if not os.path.exists(path):
            metrics, seconds = run(script, *flags, '--output', path)
            atomic_write_bytes(json.dumps(dict(metrics, seconds=seconds)).encode(), path + '.json')


def common_flags(args, seed):
    """The options every cell's script gets from the caller's own."""
    flags = ['--data_root', args.data_root, '--dataset', args.dataset, '--seed', seed]
    flags += ['--device', args.device] if args.device else []
    flags += ['--threads', args.threads] if args.threads else []
    return flags


def cell_commands(args, attack, seed, work, log_root, given_model=None):
    """-> {defense: function returning (metrics, seconds)} for the cells of one (attack, seed), on the
    backdoored model <work>/<attack>.tar (built when first needed), or on given_model."""
    common = common_flags(args, seed)
    trains = [*common, '--log_root', log_root]  # the scripts that train write a CSV per run
    epochs = ['--epochs', args.epochs] if getattr(args, 'epochs', None) is not None else []
    path = given_model or os.path.join(work, f'{attack}.tar')
    pattern = ['--trigger_path', args.trojan_pattern] if attack == 'trojan' else []
    model = (lambda: None) if given_model else \
        lambda: built_once(path, 'train_badnet.py', [*trains, *ATTACKS[attack], *pattern, '--target_label', 0, *epochs])
    s_model = ['--s_model', path, '--ratio', args.ratio, *trains]
    teacher = os.path.join(work, f'{attack}-ft.tar')
    ft = lambda: built_once(teacher, 'train_teacher.py', s_model)
    defended = lambda name: ['--output', os.path.join(work, f'{attack}-{name}.tar')]

    def then(build, script, flags):
        def cell():
            build()
            return run(script, *flags)
        return cell

    def model_and_teacher():
        model()
        ft()

    def ft_cell():  # the teacher's own training run; a teacher placed by hand is only scored
        model_and_teacher()
        if not os.path.exists(teacher + '.json'):
            return run('evaluate.py', '--model', teacher, *common)
        with open(teacher + '.json') as f:
            rec = json.load(f)
        return {k: rec[k] for k in METRICS}, rec['seconds']

    return {
        'none': then(model, 'evaluate.py', ['--model', path, *common]),
        'ft': ft_cell,
        'nad': then(model_and_teacher, 'main-ARGD.py', [*s_model, *defended('nad'), '--defense', 'nad',
                                                        '--t_model', teacher]),
        'argd': then(model_and_teacher, 'main-ARGD.py', [*s_model, *defended('argd'), '--t_model', teacher]),
        'mcl': then(model, 'main_mcl.py', [*s_model, *defended('mcl'), '--mcl_target', 0]),
    }


def all_cells(attacks, seeds):
    return [(a, d, s) for a in attacks for s in seeds for d in DEFENSES]


def cell_path(table_dir, attack, defense, seed):
    return os.path.join(table_dir, 'cells', f'{attack}-{defense}-s{seed}.json')


def merge(args, attacks):
    """Rebuild table.csv and table.md from every finished cell file (under the table lock)."""
    with locked(os.path.join(args.table_dir, 'table.lock'), wait=True):
        folder = os.path.join(args.table_dir, 'cells')
        rows = []
        for name in sorted(os.listdir(folder)):
            if name.endswith('.json'):
                with open(os.path.join(folder, name)) as f:
                    rows.append(json.load(f))
        order = {c: i for i, c in enumerate(all_cells(list(ATTACKS), sorted({r['seed'] for r in rows})))}
        rows.sort(key=lambda r: order.get((r['attack'], r['defense'], r['seed']), len(order)))
        write_csv(rows, os.path.join(args.table_dir, 'table.csv'))
        write_markdown(rows, os.path.join(args.table_dir, 'table.md'), [a for a in ATTACKS if a in attacks or
                                                                        any(r['attack'] == a for r in rows)])


def mean_std(values):
    return f'{statistics.mean(values):.2f}' + (f' ± {statistics.stdev(values):.2f}' if len(values) > 1 else '')


def write_markdown(rows, path, attacks):
    head = '| attack | ' + ' | '.join(DEFENSES) + ' |'
    lines = ['ACC (non-target) / ASR in %, mean ± std over the seeds (n = number of seeds), and the mean wall '
             'time of the cell; 5% clean data.', '', head, '|' + ' --- |' * (len(DEFENSES) + 1)]
    for a in attacks:
        cells = []
        for d in DEFENSES:
            got = [r for r in rows if r['attack'] == a and r['defense'] == d]
            cells.append(f"{mean_std([float(r['ACC']) for r in got])} / {mean_std([float(r['ASR']) for r in got])} "
                         f"(n={len(got)}, {statistics.mean(float(r['seconds']) for r in got):.0f}s)" if got else '—')
        lines.append(f'| {a} | ' + ' | '.join(cells) + ' |')
    atomic_write_bytes(('\n'.join(lines) + '\n').encode(), path)


def work_through(args, cells, attacks):
    """The worker loop: every cell not done and not held by another worker, once."""
    for attack, defense, seed in cells:
        out = cell_path(args.table_dir, attack, defense, seed)
        if os.path.exists(out):
            continue
        with locked(out + '.lock', wait=False) as mine:
            if not mine or os.path.exists(out):  # another worker runs it, or just finished it
                continue
            work = os.path.join(args.checkpoint_root, 'table', f's{seed}')
            log_root = os.path.join(args.table_dir, 'logs', f's{seed}')
            metrics, seconds = cell_commands(args, attack, seed, work, log_root)[defense]()
            row = dict(attack=attack, defense=defense, seed=seed, **{k: metrics[k] for k in METRICS}, seconds=seconds)
            atomic_write_bytes(json.dumps(row).encode(), out)
        merge(args, attacks)
        print(f"{attack:7s} {defense:5s} seed {seed}  ACC {metrics['ACC']:6.2f} ASR {metrics['ASR']:6.2f} "
              f"RA {metrics['RA']:6.2f}  {seconds:.0f}s", flush=True)


def parse_list(text, what, allowed=None, cast=str):
    try:
        items = [cast(v.strip()) for v in str(text).split(',') if v.strip()]
    except ValueError:
        raise UserError(f"--{what} needs a comma-separated list, got '{text}'")
    for v in items:
        if allowed is not None and v not in allowed:
            raise UserError(f"unknown {what[:-1]} '{v}' (choose from {', '.join(allowed)})")
    if not items:
        raise UserError(f'--{what} is empty')
    return items


def parse_shard(text):
    try:
        k, n = (int(v) for v in text.split('/'))
        assert 0 <= k < n
    except (ValueError, AssertionError):
        raise UserError(f"--shard needs K/N with 0 <= K < N, got '{text}'")
    return k, n


def start_workers(args, n):
    """n copies of this command with --workers 1, each on its own GPU when there are several."""
    import torch
    gpus = torch.cuda.device_count() if args.device is None or args.device == 'cuda' else 0
    argv = [a for a in sys.argv[1:]]
    if '--workers' in argv:
        i = argv.index('--workers')
        del argv[i:i + 2]
    procs = []
    for i in range(n):
        device = ['--device', f'cuda:{i % gpus}'] if gpus > 1 else []
        procs.append(subprocess.Popen([sys.executable, os.path.abspath(__file__), *argv, *device, '--workers', '1']))
    codes = [p.wait() for p in procs]
    if any(codes):
        raise UserError(f'{sum(c != 0 for c in codes)} of {n} workers failed (exit codes {codes}); rerun to finish')


def main():
    args = parse_args('run_table.py', description=__doc__.split('\n\n')[0])
    attacks = parse_list(args.attacks, 'attacks', ATTACKS)
    seeds = parse_list(args.seeds, 'seeds', cast=int)
    if 'trojan' in attacks and not (args.trojan_pattern and os.path.isfile(args.trojan_pattern)):
        raise UserError("the trojan row needs --trojan_pattern: the references' additive pattern "
                        "(trigger/best_square_trigger_cifar10.npz of bboylyg/NAD)" +
                        (f", not found: '{args.trojan_pattern}'" if args.trojan_pattern else ''))
    cells = all_cells(attacks, seeds)
    if args.shard:
        k, n = parse_shard(args.shard)
        cells = cells[k::n]
    if args.workers > 1:
        return start_workers(args, args.workers)
    work_through(args, cells, attacks)


if __name__ == '__main__':
    main_guard(main)
