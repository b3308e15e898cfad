"""The results table: attacks x defenses x defense seeds, each cell run once by any number of workers.

    python run_table.py --data_root /tmp/data/cifar10                           # the zoo's rows, seed 0
    python run_table.py --data_root /tmp/data/cifar10 --attacks badnet --seeds 0,1,2
    python run_table.py --data_root /tmp/data/cifar10 --seeds 0,1,2 --workers 4   # 4 processes here
    python run_table.py --data_root /data/cifar10 --seeds 0,1,2 --shard $SLURM_ARRAY_TASK_ID/8
    python run_table.py --data_root /tmp/data/cifar10 --attacks trojan --trojan_pattern best_square_trigger_cifar10.npz

A row's backdoored model is the zoo's (<checkpoint_root>/zoo/<attack>.tar, --model_seed 0) when it
exists, else one trained here once with --model_seed; --seeds are the defense seeds (clean subset,
teacher, initialisation). A cell is (attack, defense, seed) under a set of settings (data set, ratio,
the model); its result lands in <table_dir>/cells/<attack>-<defense>-s<seed>-<hash of the settings>.json
with the settings inside, so a rerun with other settings makes new cells and leaves the old ones
alone. table.csv (one row per cell) and table.md (mean +- std over the seeds; one table per data set and
ratio, a row per model, labelled with its settings hash) are rebuilt from those files under a lock. A worker holds a lock on a cell while it runs
it; the operating system drops the lock if the worker dies, so workers on one machine or many sharing
a file system run each cell once, and a killed worker's cell is redone by the next run.
"""
import json
import os
import statistics
import subprocess
import sys

import torch
from tqdm import tqdm

import config
from cli import main_guard, parse_args
from defenses import registry
from errors import UserError
from files import atomic_write_bytes, write_csv
from metrics import METRICS
from table import (ATTACKS, BLIND, COLUMNS, cell_commands, cell_settings, column_recipe, dataset_of, locked,
                   short_hash, zoo_model)

RETUNED = ('ASR_retuned', 'ACC_retuned', 'RA_retuned')  # the same model after the retuning attack (retune.py)
# what a defense found, kept in its cell where it reports it (each module's FINDINGS: NC's flagged classes, ...)
DEFENSE_FINDINGS = tuple(dict.fromkeys(f for spec in registry().values() for f in spec.findings))


def all_cells(attacks, seeds, columns=tuple(COLUMNS)):
    return [(a, d, s) for a in attacks for s in seeds for d in columns]


def cell_path(table_dir, attack, defense, seed, key, recipe):
    """A cell's file: named by its row's settings (key) and its column's recipe (table.recipe_key)."""
    return os.path.join(table_dir, 'cells', f'{attack}-{defense}-s{seed}-{key}-{recipe}.json')


def current_recipes(table_dir):
    """{column: recipe_key} of config.py as it is now; each recipe is kept readable in <table_dir>/recipes/."""
    keys = {}
    for column in COLUMNS:
        recipe = column_recipe(column)
        keys[column] = short_hash(recipe)
        path = os.path.join(table_dir, 'recipes', f'{column}-{keys[column]}.json')
        if not os.path.exists(path):
            os.makedirs(os.path.dirname(path), exist_ok=True)
            atomic_write_bytes(json.dumps(recipe, indent=1, sort_keys=True).encode(), path)
    return keys


def merge(args, recipes=None):
    """Rebuild table.csv and table.md from every finished cell file (under the table lock)."""
    with locked(os.path.join(args.table_dir, 'table.lock'), wait=True):
        folder = os.path.join(args.table_dir, 'cells')
        rows, recipes = [], recipes or current_recipes(args.table_dir)
        for name in sorted(os.listdir(folder)):
            if name.endswith('.json'):
                with open(os.path.join(folder, name)) as f:
                    rows.append(json.load(f))
        # a cell of another recipe than config.py's now (an edited entry) is kept in its file, not tabulated
        current = [recipes.get(r['defense']) == r.get('recipe_key') for r in rows]
        rows, other = [r for r, c in zip(rows, current) if c], current.count(False)
        order = {c: i for i, c in enumerate(all_cells(list(ATTACKS), sorted({r['seed'] for r in rows})))}
        rows.sort(key=lambda r: (order.get((r['attack'], r['defense'], r['seed']), len(order)), r['settings_key']))
        write_csv([{k: (json.dumps(v) if isinstance(v, (dict, list)) else v) for k, v in r.items()} for r in rows],
                  os.path.join(args.table_dir, 'table.csv'))
        write_markdown(rows, os.path.join(args.table_dir, 'table.md'), other)


def mean_std(values):
    return f'{statistics.mean(values):.2f}' + (f' ± {statistics.stdev(values):.2f}' if len(values) > 1 else '')


# what only says which model a row starts from
MODEL_KEYS = ('attack', 'zoo', 'trojan_pattern', 'refool_source', 'epochs', 'model_seed', 'model')


SHOWN = (('ACC', 'ACC'), ('ACC_target', 'ACC_target'), ('ASR', 'ASR'), ('ASR_retuned', 'ASR re-tuned'),
         ('RA_retuned', 'RA re-tuned'))  # a cell's numbers in table.md, in this order


def class_columns(per_class, small):
    """The mean over the seeds of the test accuracy per class -> [its lowest class as 'acc (id)', and the
    small classes' accuracies 'a / b / c' where the data set names some]; dashes where none was kept."""
    if not per_class:
        return ['–'] + (['–'] if small else [])
    mean = [statistics.mean(column) for column in zip(*per_class)]
    lowest = min(range(len(mean)), key=mean.__getitem__)
    return [f'{mean[lowest]:.1f} ({lowest})'] + ([' / '.join(f'{mean[c]:.1f}' for c in small)] if small else [])


def write_markdown(rows, path, other=0):
    """One section per set of shared settings (data set, ratio, how the models were made) and, in it,
    a table per backdoored model with a line per defense, so cells of different settings never mix;
    the models are listed under each section."""
    lines = ['ACC (non-target) / ACC_target / ASR, then ASR and RA after the retuning attack (retune.py), in %, '
             'mean ± std over the defense seeds (n), the mean wall time of a cell (with its re-tuning), and ⚠ where a '
             "defense warned that it cut accuracy on the defender's clean subset by more than 10 points. "
             "'clean control' is the never-poisoned model under the row's trigger: the floor a real erasure reaches. "
             '– : not recorded (cells run before RA after re-tuning was kept). Settings are printed above each section; '
             "each defense's recipe (config.py's, through its options) is in recipes/<defense>-<recipe_key>.json."]
    if other:
        lines.append(f'Not shown: {other} cells run with another recipe than config.py has now (cells/*.json).')
    shared = lambda r: json.dumps({k: v for k, v in r['settings'].items() if k not in MODEL_KEYS}, sort_keys=True)
    for common in sorted({shared(r) for r in rows}):
        group = [r for r in rows if shared(r) == common]
        lines += ['', f'Settings: {common}']
        models = list(dict.fromkeys(r['settings_key'] for r in group))  # in the rows' order (attack order)
        for key in models:
            rows_of = [r for r in group if r['settings_key'] == key]
            small = config.DATASETS[dataset_of(rows_of[0]['settings'])]['small_classes']
            per_class = ['lowest class (id)'] + ([f"classes {' / '.join(map(str, small))}"] if small else [])
            lines += ['', f"**{rows_of[0]['attack']}** [{key}]", '',
                      '| defense | ' + ' | '.join([label for _, label in SHOWN] + per_class) + ' | n | s |',
                      '|' + ' --- |' * (len(SHOWN) + len(per_class) + 3)]
            for d, spec in COLUMNS.items():
                got = [r for r in rows_of if r['defense'] == d]
                if not got:
                    continue
                shown = [mean_std([float(r[k]) for r in got if r.get(k) is not None])
                         if any(r.get(k) is not None for r in got) else '–' for k, _ in SHOWN]
                warned = ' ⚠' * any(r.get('warning') for r in got)
                seconds = statistics.mean(float(r['seconds']) for r in got)
                told = '' if d in BLIND or d in ('none', 'floor') else ' (told the target)'
                shown += class_columns([r['per_class'] for r in got if r.get('per_class')], small)
                lines.append(f"| {spec['label']}{told}{warned} | " + ' | '.join(shown) + f' | {len(got)} | {seconds:.0f} |')
        first = {r['settings_key']: r for r in reversed(group)}
        lines += [''] + [f"[{key}] " + json.dumps({k: v for k, v in first[key]['settings'].items()
                                                    if k in MODEL_KEYS and v is not None}) for key in models]
    atomic_write_bytes(('\n'.join(lines) + '\n').encode(), path)


def work_through(args, cells):
    """The worker loop: every cell not done and not held by another worker, once. On a terminal, a bar
    over the cells shows the running cell and the last line its script printed."""
    bar = tqdm(cells, desc='cells', unit='cell', disable=None, dynamic_ncols=True)
    watch = lambda line: bar.set_postfix_str(line[-80:], refresh=True)
    recipes = current_recipes(args.table_dir)
    for attack, defense, seed in bar:
        bar.set_description(f'{attack} {defense} seed {seed}')
        settings = cell_settings(args, attack)
        key = short_hash(settings)
        out = cell_path(args.table_dir, attack, defense, seed, key, recipes[defense])
        if os.path.exists(out):
            continue
        with locked(out + '.lock', wait=False) as mine:
            if not mine or os.path.exists(out):  # another worker runs it, or just finished it
                continue
            work = os.path.join(args.checkpoint_root, 'table', key, f's{seed}')
            log_root = os.path.join(args.table_dir, 'logs', key, f's{seed}')
            metrics, seconds = cell_commands(args, attack, seed, work, log_root, names=[defense], watch=watch)[defense]()
            row = dict(attack=attack, defense=defense, seed=seed, **{k: metrics[k] for k in METRICS},
                       **{k: metrics.get(k) for k in (*RETUNED, 'path_ASR', 'per_class', 'subset_before', 'subset_after',
                                                        'warning', 'synthesised_class')},
                       **{k: metrics[k] for k in DEFENSE_FINDINGS if k in metrics},
                       seconds=seconds, settings_key=key, settings=settings, recipe_key=recipes[defense])
            atomic_write_bytes(json.dumps(row).encode(), out)
        merge(args, recipes)  # the recipes of this run's config.py, read once
        bar.write(f"{attack:7s} {defense:5s} seed {seed}  ACC {metrics['ACC']:6.2f} ACC_target {metrics['ACC_target']:6.2f} "
                  f"ASR {metrics['ASR']:6.2f} RA {metrics['RA']:6.2f} "
                  f"ASR_retuned {metrics.get('ASR_retuned', float('nan')):6.2f} "
                  f"RA_retuned {metrics.get('RA_retuned', float('nan')):6.2f}  {seconds:.0f}s" +
                  (f"  warning: {metrics['warning']}" if metrics.get('warning') else ''))
        sys.stdout.flush()  # a line per cell in a log file too, as it lands


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
    """n copies of this command with --workers 1, each on its own GPU when there are several (several on one
    GPU share it), each with an equal share of the CPU cores unless --threads says otherwise: n processes
    of torch's default (every core) would run n times more threads than cores."""
    gpus = torch.cuda.device_count() if args.device is None or args.device == 'cuda' else 0
    argv = [a for a in sys.argv[1:]]
    if '--workers' in argv:
        i = argv.index('--workers')
        del argv[i:i + 2]
    threads = [] if args.threads else ['--threads', max(1, (os.cpu_count() or 1) // n)]
    procs = []
    for i in range(n):
        device = ['--device', f'cuda:{i % gpus}'] if gpus > 1 else []
        procs.append(subprocess.Popen([sys.executable, os.path.abspath(__file__), *argv, *map(str, threads), *device,
                                       '--workers', '1']))
    codes = [p.wait() for p in procs]
    if any(codes):
        raise UserError(f'{sum(c != 0 for c in codes)} of {n} workers failed (exit codes {codes}); rerun to finish')


def main():
    args = parse_args('run_table.py', description=__doc__.split('\n\n')[0])
    for name, instead in (('seed', '--seeds (the defense seeds) and --model_seed'), ('json', 'table.csv')):
        if name in args.given:  # each cell has its own seed and JSON summary
            raise UserError(f'run_table.py does not take --{name}: use {instead}')
    attacks = parse_list(args.attacks, 'attacks', ATTACKS)
    seeds = parse_list(args.seeds, 'seeds', cast=int)
    columns = parse_list(args.defenses, 'defenses', COLUMNS) if args.defenses else list(COLUMNS)
    needs_pattern = 'trojan' in attacks and not zoo_model(args, 'trojan')  # a zoo's trojan model carries it
    if needs_pattern and not (args.trojan_pattern and os.path.isfile(args.trojan_pattern)):
        raise UserError("the trojan row needs --trojan_pattern: the references' additive pattern "
                        "(trigger/best_square_trigger_cifar10.npz of bboylyg/NAD)" +
                        (f", not found: '{args.trojan_pattern}'" if args.trojan_pattern else ''))
    source = args.refool_source and os.path.isdir(os.path.join(args.refool_source, 'train'))
    if 'refool' in attacks and not zoo_model(args, 'refool') and not source:  # a zoo's Refool model carries its reflections
        raise UserError("the refool row needs --refool_source: another data set's image folder, its reflections "
                        "(GTSRB's for CIFAR-10, CIFAR-10's for GTSRB)" +
                        (f", not an image folder: '{args.refool_source}'" if args.refool_source else ''))
    cells = all_cells(attacks, seeds, columns)
    if args.shard:
        k, n = parse_shard(args.shard)
        cells = cells[k::n]
    if args.workers > 1:
        return start_workers(args, args.workers)
    work_through(args, cells)


if __name__ == '__main__':
    main_guard(main)
