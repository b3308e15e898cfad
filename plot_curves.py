"""ACC and ASR per epoch of every defense on one backdoored model, from run_table.py's logs; and the
robustness picture: ASR before and after the retuning attack, per attack and defense, from table.csv.

    python plot_curves.py                         # results/curves_badnet.png from results/logs/<settings>/s0
    python plot_curves.py --attacks blended,wanet # one picture per attack
    python plot_curves.py --robustness            # results/robustness.png
    python plot_curves.py --dataset GTSRB         # only GTSRB's: results/curves_badnet_gtsrb.png

A picture per data set in table.csv: CIFAR-10's as named above, the others' with the data set's name
added (robustness_gtsrb.png).

Needs matplotlib (optional: pip install matplotlib); nothing else in the project imports it.
Epoch 0 is the backdoored model; rows before the last score a fixed --eval_subset of the
test sets, the last row the full sets.
"""
import csv
import glob
import io
import json
import os

from cli import main_guard, parse_args
from errors import UserError
from files import atomic_write_bytes
from table import COLUMNS, dataset_of


def picture_path(table_dir, stem, dataset):
    """results/<stem>.png for CIFAR-10 (the first data set), results/<stem>_<data set>.png for the others."""
    return os.path.join(table_dir, f'{stem}.png' if dataset == 'CIFAR10' else f'{stem}_{dataset.lower()}.png')


def table_rows(table_dir):
    """table.csv's cells, each with the data set its settings name; [] where there is no table yet."""
    path = os.path.join(table_dir, 'table.csv')
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [dict(r, dataset=dataset_of(json.loads(r['settings']))) for r in csv.DictReader(f)]


def log_folder(table_dir, seed, attack, keys):
    """The newest of run_table.py's log folders (one per set of settings, named by its hash) with this
    attack's logs, among the settings `keys` (one data set's)."""
    found = [p for p in glob.glob(os.path.join(table_dir, 'logs', '*', f's{seed}', f'*_{attack}.csv'))
             if os.path.basename(os.path.dirname(os.path.dirname(p))) in keys]
    return os.path.dirname(max(found, key=os.path.getmtime)) if found else None


def read_curves(log_dir, attack):
    """-> {label: (epochs, ACC, ASR)} for the defenses whose log exists."""
    curves = {}
    for d in COLUMNS.values():
        if d['log'] is None:
            continue
        label, path = d['label'], os.path.join(log_dir, f"{d['log']}_{attack}.csv")
        if not os.path.exists(path):
            continue
        with open(path) as f:
            rows = [r for r in csv.DictReader(f) if r.get('ACC')]
        curves[label] = tuple([float(r[k]) for r in rows] for k in ('epoch', 'ACC', 'ASR'))
    return curves


def pyplot():
    try:
        import matplotlib
        matplotlib.use('Agg')
        import matplotlib.pyplot as plt
    except ImportError:
        raise UserError('plot_curves.py needs matplotlib (pip install matplotlib); nothing else does')
    return plt


def png(fig, plt):
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format='png', dpi=110)
    plt.close(fig)
    return buf.getvalue()


def plot(curves, title):
    """-> PNG bytes: ACC (left) and ASR (right) against epoch, one line per defense."""
    plt = pyplot()
    from matplotlib.ticker import MaxNLocator
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for label, (epochs, acc, asr) in curves.items():
        axes[0].plot(epochs, acc, marker='.', label=label)
        axes[1].plot(epochs, asr, marker='.', label=label)
    for ax, name in zip(axes, ('ACC (non-target) %', 'ASR %')):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel('epoch')
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
    axes[1].set_yscale('symlog', linthresh=10)  # the interesting part is 0-10%
    axes[0].legend()
    fig.suptitle(title)
    return png(fig, plt)


def read_robustness(rows):
    """table.csv's rows -> {model: {label: (mean ASR, mean ASR after re-tuning, mean ASR along the straight path
    or None, mean ASR along the defense's own path (MCR's curve) or None)}} over the seeds of the re-tuned cells; a model is its attack, with its settings hash where one
    attack has cells on several models (a retrained row), so two models never share a bar. Only models with a
    defended cell's path are drawn: no empty panels."""
    rows = [r for r in rows if r.get('ASR_retuned')]
    # a panel only where a defended cell kept its path (not the control's row, not a model whose file was lost)
    models = list(dict.fromkeys((r['attack'], r['settings_key']) for r in rows
                                if r['defense'] not in ('none', 'floor') and r.get('path_ASR')))
    attacks = [attack for attack, _ in models]
    out = {}
    for attack, key in models:
        title = attack if attacks.count(attack) == 1 else f'{attack} [{key}]'
        for name, d in COLUMNS.items():
            got = [r for r in rows if (r['attack'], r['settings_key'], r['defense']) == (attack, key, name)]
            if got:
                mean = lambda k: sum(float(r[k]) for r in got) / len(got)
                out.setdefault(title, {})[d['label']] = (mean('ASR'), mean('ASR_retuned'), mean_path(got, 'path_ASR'),
                                                         mean_path(got, d['curve']))
    return out


def mean_path(rows, key):
    """The mean over the seeds of a list column (path_ASR: the straight line; a defense's own path: MCR's curve), or
    None (no such column)."""
    paths = [json.loads(r[key]) for r in rows if key and r.get(key)]
    return [sum(p[i] for p in paths) / len(paths) for i in range(len(paths[0]))] if paths else None


def plot_robustness(data):
    """-> PNG bytes: one column per attack; on top a pair of bars (ASR, ASR after re-tuning) per defense,
    below the ASR along the straight line from the backdoored weights (t = 0) to each defense's (t = 1), and
    dashed, along MCR's curve from the backdoored weights to FT's."""
    plt = pyplot()
    fig, axes = plt.subplots(2, len(data), figsize=(3.4 * len(data), 6.4), sharey='row', squeeze=False)
    for col, (attack, cells) in enumerate(data.items()):
        ax, path_ax = axes[0][col], axes[1][col]
        xs = range(len(cells))
        ax.bar([x - 0.2 for x in xs], [v[0] for v in cells.values()], 0.4, label='after the defense')
        ax.bar([x + 0.2 for x in xs], [v[1] for v in cells.values()], 0.4, label='after re-tuning (5 poisoned)')
        ax.set_xticks(list(xs))
        ax.set_xticklabels(list(cells), rotation=60, fontsize=7)
        ax.set_title(attack)
        ax.grid(alpha=0.3, axis='y')
        for label, (_, _, path, curve) in cells.items():
            if path:
                line, = path_ax.plot([i / (len(path) - 1) for i in range(len(path))], path, marker='.', label=label)
            if curve:  # MCR: along its Bezier curve (t = 1: FT's teacher; its model is the point it chose)
                path_ax.plot([i / (len(curve) - 1) for i in range(len(curve))], curve, linestyle='--',
                             color=line.get_color() if path else None, label=f'{label} curve (t=1: FT)')
        path_ax.set_xlabel('t (0: backdoored, 1: defended)')
        path_ax.grid(alpha=0.3)
        if path_ax.lines:
            path_ax.legend(fontsize=6)
    axes[0][0].set_ylabel('ASR %')
    axes[1][0].set_ylabel('ASR % along the path')
    axes[0][0].legend(fontsize=7)
    return png(fig, plt)


def main():
    args = parse_args('plot_curves.py', description=__doc__.split('\n\n')[0])
    rows = table_rows(args.table_dir)
    datasets = [args.dataset] if args.dataset else dict.fromkeys(r['dataset'] for r in rows)
    drawn = [out for dataset in datasets for out in draw(args, dataset, [r for r in rows if r['dataset'] == dataset])]
    if not drawn:
        which = f'{args.dataset} ' if args.dataset else ''
        what = 're-tuned cells' if args.robustness else f'defense logs for {args.attacks}'
        how = 'run_table.py' if args.robustness else f'run_table.py --attacks {args.attacks}'
        raise UserError(f'no {which}{what} under {args.table_dir} (run {how} first)')


def draw(args, dataset, rows):
    """Write the data set's pictures from its table rows -> their paths (none where cells or logs are missing)."""
    if args.robustness:
        data = read_robustness(rows)
        if not data:
            return []
        out = picture_path(args.table_dir, 'robustness', dataset)
        atomic_write_bytes(plot_robustness(data), out)
        print(f"{out}: {', '.join(data)}")
        return [out]
    written = []
    for attack in [a.strip() for a in args.attacks.split(',')]:
        log_dir = log_folder(args.table_dir, args.seed, attack, {r['settings_key'] for r in rows})
        curves = read_curves(log_dir, attack) if log_dir else {}
        if curves:
            out = picture_path(args.table_dir, f'curves_{attack}', dataset)
            atomic_write_bytes(plot(curves, f'Defenses on the {dataset} {attack} WRN-16-1 (5% clean data)'), out)
            print(f"{out}: {', '.join(curves)}")
            written.append(out)
    return written


if __name__ == '__main__':
    main_guard(main)
