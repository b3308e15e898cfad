"""The results table: for each attack, a backdoored WRN-16-1 and every defense on 5% clean data.

    python run_table.py --data_root /tmp/data/cifar10                       # the full grid (hours on CPU)
    python run_table.py --data_root /tmp/data/cifar10 --attacks badnet      # one row

Each cell runs the project's own script in a subprocess and is appended to
<table_dir>/table.csv as soon as it finishes; finished cells are skipped on the next run,
so the grid resumes where it stopped. <table_dir>/table.md is rewritten after every cell.
Backdoored models: <checkpoint_root>/table/<attack>.tar (reused when present).
"""
import csv
import json
import os
import subprocess
import sys
import time

from config import UserError, main_guard, parse_args
from utils import atomic_write_bytes, write_csv

ATTACKS = {'badnet': 'gridTrigger', 'blend': 'blendTrigger', 'sig': 'signalTrigger', 'wanet': 'wanetTrigger'}
DEFENSES = ('none', 'ft', 'nad', 'argd', 'mcl')
HERE = os.path.dirname(os.path.abspath(__file__))


def run(script, *flags):
    """Run a project script, return (its JSON summary, wall seconds); a failure stops the grid."""
    t0 = time.time()
    r = subprocess.run([sys.executable, os.path.join(HERE, script), *map(str, flags), '--json'], capture_output=True,
                       text=True)
    if r.returncode != 0:
        raise UserError(f'{script} {" ".join(map(str, flags))} failed: {r.stderr.strip().splitlines()[-1:]}')
    return json.loads(r.stdout.strip().splitlines()[-1]), round(time.time() - t0, 1)


def common_flags(args, log_root):
    """The options every cell's script gets from the caller's own."""
    flags = ['--data_root', args.data_root, '--dataset', args.dataset, '--seed', args.seed, '--ratio', args.ratio,
             '--eval_every', args.eval_every, '--log_root', log_root]
    flags += ['--device', args.device] if args.device else []
    flags += ['--threads', args.threads] if args.threads else []
    return flags


def cell_commands(attack, model, work):
    """The command of each cell; every defense reads the backdoored model `model`."""
    defended = lambda name: ['--s_model', model, '--output', os.path.join(work, f'{attack}-{name}.tar')]
    teacher = os.path.join(work, f'{attack}-ft.tar')
    return {
        'none': ('evaluate.py', ['--model', model]),
        'ft': ('train_teacher.py', defended('ft')),
        'nad': ('main-ARGD.py', defended('nad') + ['--defense', 'nad', '--t_model', teacher]),
        'argd': ('main-ARGD.py', defended('argd') + ['--t_model', teacher]),
        'mcl': ('main_mcl.py', defended('mcl') + ['--target_label', 0]),
    }


def write_markdown(rows, path, attacks):
    by = {(r['attack'], r['defense']): r for r in rows}
    head = '| attack | ' + ' | '.join(DEFENSES) + ' |'
    lines = ['ACC (non-target) / ASR / RA in %, and wall time of the defense; 5% clean data.', '', head,
             '|' + ' --- |' * (len(DEFENSES) + 1)]
    for a in attacks:
        cells = []
        for d in DEFENSES:
            r = by.get((a, d))
            cells.append(' / '.join(f'{float(r[k]):.2f}' for k in ('ACC', 'ASR', 'RA')) + f" ({float(r['seconds']):.0f}s)"
                         if r else '—')
        lines.append(f'| {a} | ' + ' | '.join(cells) + ' |')
    atomic_write_bytes(('\n'.join(lines) + '\n').encode(), path)


def main():
    args = parse_args(epochs=20, description=__doc__.split('\n')[0])  # --epochs: backdoor training
    attacks = [a.strip() for a in args.attacks.split(',')]
    for a in attacks:
        if a not in ATTACKS:
            raise UserError(f"unknown attack '{a}' (choose from {', '.join(ATTACKS)})")
    common = common_flags(args, os.path.join(args.table_dir, 'logs'))
    work = os.path.join(args.checkpoint_root, 'table')
    csv_path = os.path.join(args.table_dir, 'table.csv')
    os.makedirs(work, exist_ok=True)
    rows = []
    if os.path.exists(csv_path):
        with open(csv_path) as f:
            rows = list(csv.DictReader(f))
    done = {(r['attack'], r['defense']) for r in rows}
    for attack in attacks:
        model = os.path.join(work, f'{attack}.tar')
        if not os.path.exists(model):
            print(f'{attack}: training the backdoored model ({args.epochs} epochs)', flush=True)
            run('train_badnet.py', *common, '--trigger_type', ATTACKS[attack], '--target_label', 0,
                '--epochs', args.epochs, '--output', model)
        for defense, (script, flags) in cell_commands(attack, model, work).items():
            if (attack, defense) in done:
                continue
            metrics, seconds = run(script, *common, *flags)
            rows.append(dict(attack=attack, defense=defense, **metrics, seconds=seconds))
            write_csv(rows, csv_path)
            write_markdown(rows, os.path.join(args.table_dir, 'table.md'), attacks)
            print(f"{attack:7s} {defense:5s} ACC {metrics['ACC']:6.2f} ASR {metrics['ASR']:6.2f} "
                  f"RA {metrics['RA']:6.2f}  {seconds:.0f}s", flush=True)


if __name__ == '__main__':
    main_guard(main)
