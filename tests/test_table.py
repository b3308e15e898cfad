"""run_table.py: every cell once, whatever the workers; resumable; plot_curves.py draws the logs."""
import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

import config

from conftest import ROOT, run_script
from table import ATTACKS, COLUMNS


TESTED = ('none', 'ft', 'nad', 'argd', 'mcl', 'floor')  # the new defenses run end to end in test_purify.py


def table_flags(backdoored, image_folder, tmp_path, seeds='0', retune=False, clean=None):
    """A table whose backdoored model is the fixture's, placed as the zoo's (reused, not retrained),
    beside the clean control when given."""
    (tmp_path / 'w' / 'zoo').mkdir(parents=True, exist_ok=True)
    shutil.copy(backdoored['path'], tmp_path / 'w' / 'zoo' / 'badnet.tar')
    if clean:
        shutil.copy(clean['path'], tmp_path / 'w' / 'zoo' / 'clean.tar')
    return ['--dataset', 'ImageFolder', '--data_root', image_folder, '--attacks', 'badnet', '--ratio', 0.5,
            '--seeds', seeds, '--checkpoint_root', tmp_path / 'w', '--table_dir', tmp_path / 'results',
            '--defenses', ','.join(TESTED if clean else TESTED[:-1]), *([] if retune else ['--skip_retune'])]


def read_rows(tmp_path):
    with open(tmp_path / 'results' / 'table.csv') as f:
        return list(csv.DictReader(f))


def cells_of(rows):
    return [(r['attack'], r['defense'], r['seed']) for r in rows]


@pytest.mark.slow
def test_table_fills_each_cell_once_and_resumes(backdoored, clean_control, image_folder, tmp_path):
    flags = table_flags(backdoored, image_folder, tmp_path, retune=True, clean=clean_control)
    r = run_script('run_table.py', *flags)
    assert r.returncode == 0, r.stderr
    rows = read_rows(tmp_path)
    assert cells_of(rows) == [('badnet', d, '0') for d in TESTED]
    assert float(rows[0]['ASR']) == backdoored['metrics']['ASR']
    assert all(float(row['ASR']) < float(rows[0]['ASR']) for row in rows[1:]), rows  # every defense lowers it
    assert float(rows[0]['ASR_retuned']) >= 90 and all(row['ASR_retuned'] and row['RA_retuned'] for row in rows)
    floor = rows[-1]  # the clean control under the row's trigger: its own scores, not the backdoored model's
    assert floor['defense'] == 'floor' and float(floor['ASR']) == clean_control['metrics']['ASR'] <= 20
    table = (tmp_path / 'results' / 'table.md').read_text()
    assert '**badnet** [' in table and '| clean control |' in table and '| RA re-tuned |' in table
    assert '—' not in table and '–' not in table.split('Settings:')[1] and ' | 1 | ' in table
    assert not list((tmp_path / 'w').glob('table/*/*.tar'))  # the zoo's models, not new ones

    again = run_script('run_table.py', *flags)
    assert again.returncode == 0 and again.stdout.strip() == '', again.stdout
    assert read_rows(tmp_path) == rows

    pytest.importorskip('matplotlib', reason='plot_curves.py needs the optional matplotlib')
    p = run_script('plot_curves.py', '--table_dir', tmp_path / 'results')
    assert p.returncode == 0, p.stderr
    assert (tmp_path / 'results' / 'curves_badnet_imagefolder.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
    assert 'FT, NAD, ARGD, MCL' in p.stdout
    p = run_script('plot_curves.py', '--table_dir', tmp_path / 'results', '--robustness')
    assert p.returncode == 0, p.stderr
    assert (tmp_path / 'results' / 'robustness_imagefolder.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
    p = run_script('plot_curves.py', '--table_dir', tmp_path / 'results', '--robustness', '--dataset', 'GTSRB')
    assert p.returncode != 0 and p.stderr.strip().startswith('error: no GTSRB re-tuned cells'), p.stderr


@pytest.mark.slow
def test_two_workers_at_once_run_every_cell_exactly_once(backdoored, image_folder, tmp_path):
    flags = [str(f) for f in table_flags(backdoored, image_folder, tmp_path, seeds='0,1')]
    workers = [subprocess.Popen([sys.executable, os.path.join(ROOT, 'run_table.py'), *flags], cwd=ROOT,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [w.communicate(timeout=900) for w in workers]
    assert [w.returncode for w in workers] == [0, 0], outputs
    done = [line.split()[:4] for out, _ in outputs for line in out.splitlines()]
    expected = [('badnet', d, str(s)) for s in (0, 1) for d in TESTED[:-1]]
    assert sorted((a, d, s) for a, d, _, s in done) == sorted(expected)  # each cell run by one worker only
    assert all(out for out, _ in outputs), 'both workers took cells'
    rows = read_rows(tmp_path)
    assert cells_of(rows) == expected  # one row per cell, none lost by the concurrent writers
    assert len(list((tmp_path / 'w').glob('table/*/s1/badnet-ft-*.tar'))) == 1  # one teacher per seed
    table = (tmp_path / 'results' / 'table.md').read_text()
    assert '± ' in table and ' | 2 | ' in table


@pytest.mark.slow
def test_a_killed_worker_cell_is_redone_by_the_next_run(backdoored, image_folder, tmp_path):
    flags = [str(f) for f in table_flags(backdoored, image_folder, tmp_path)]
    worker = subprocess.Popen([sys.executable, os.path.join(ROOT, 'run_table.py'), *flags], cwd=ROOT,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    cells = tmp_path / 'results' / 'cells'
    deadline = time.time() + 300
    logs = tmp_path / 'results' / 'logs'
    while not list(logs.glob('*/s0/teacher_badnet.csv')) and time.time() < deadline:  # inside the FT cell
        time.sleep(0.05)
    os.killpg(worker.pid, signal.SIGKILL)  # the worker and the script it runs
    worker.wait()
    assert list(cells.glob('badnet-none-s0-*.json')) and not list(cells.glob('badnet-ft-s0-*.json'))
    r = run_script('run_table.py', *flags)
    assert r.returncode == 0, r.stderr
    assert cells_of(read_rows(tmp_path)) == [('badnet', d, '0') for d in TESTED[:-1]]


def test_shards_partition_the_cells(tmp_path):
    from run_table import all_cells
    cells = all_cells(['badnet', 'blended'], [0, 1, 2])
    shards = [cells[k::4] for k in range(4)]
    assert sorted(c for s in shards for c in s) == sorted(cells) and len(cells) == 2 * 3 * len(COLUMNS)
    r = run_script('run_table.py', '--shard', '4/4', '--table_dir', tmp_path / 'results', cwd=tmp_path)
    assert r.returncode == 2 and '--shard needs K/N with 0 <= K < N' in r.stderr


def test_table_rejects_an_unknown_attack(tmp_path):
    r = run_script('run_table.py', '--attacks', 'badnet,ghost', '--table_dir', tmp_path / 'results', cwd=tmp_path)
    assert r.returncode == 2
    assert r.stderr.strip() == f"error: unknown attack 'ghost' (choose from {', '.join(ATTACKS)})"
    assert list(tmp_path.iterdir()) == []


def test_the_trojan_row_needs_the_pattern_and_trains_with_it(tmp_path, monkeypatch):
    r = run_script('run_table.py', '--attacks', 'badnet,trojan', '--table_dir', tmp_path / 'results', cwd=tmp_path)
    assert r.returncode == 2 and r.stderr.startswith('error: the trojan row needs --trojan_pattern')
    assert len(r.stderr.strip().splitlines()) == 1 and list(tmp_path.iterdir()) == []
    (tmp_path / 'w' / 'zoo' / 'gtsrb').mkdir(parents=True)  # a zoo's trojan model carries its pattern in its meta
    (tmp_path / 'w' / 'zoo' / 'gtsrb' / 'trojan.tar').write_bytes(b'x')
    r = run_script('run_table.py', '--dataset', 'GTSRB', '--attacks', 'trojan', '--checkpoint_root', tmp_path / 'w',
                   '--table_dir', tmp_path / 'results', '--data_root', tmp_path / 'nothing', cwd=tmp_path)
    assert 'needs --trojan_pattern' not in r.stderr, r.stderr
    shutil.rmtree(tmp_path / 'w')
    shutil.rmtree(tmp_path / 'results', ignore_errors=True)

    import table
    from cli import parse_args
    calls = []
    monkeypatch.setattr(table, 'run', lambda script, *flags, watch=None: calls.append((script, [str(f) for f in flags])) or
                        ({'ACC': 1.0, 'ASR': 2.0, 'RA': 3.0}, 1.0))
    monkeypatch.chdir(tmp_path)
    (tmp_path / 'x.npz').write_bytes(b'a pattern')  # the settings hash its content
    args = parse_args('run_table.py', ['--data_root', 'd', '--trojan_pattern', 'x.npz', '--model_seed', 3,
                                       '--checkpoint_root', tmp_path])
    table.cell_commands(args, 'trojan', 4, str(tmp_path), str(tmp_path / 'logs'))['none']()
    (train, flags), (score, score_flags), (retune, retune_flags) = calls
    assert train == 'train_badnet.py' and score == 'evaluate.py' and retune == 'retune.py'
    model = flags[flags.index('--output') + 1]
    assert score_flags[score_flags.index('--model') + 1] == retune_flags[retune_flags.index('--model') + 1] == model
    assert flags[flags.index('--trigger_type') + 1] == 'trojanTrigger'
    assert flags[flags.index('--trigger_path') + 1] == 'x.npz' and flags[flags.index('--seed') + 1] == '3'
    assert '--trigger_path' not in score_flags  # the pattern travels in the checkpoint's meta
    assert score_flags[score_flags.index('--seed') + 1] == '4'  # the defense seed


def test_benchmark_times_every_defense_on_the_given_model_without_a_table(monkeypatch, tmp_path):
    """benchmark.py --end_to_end reads no table options (no --model_seed) and needs no clean control."""
    import benchmark
    import table
    from cli import parse_args
    calls = []

    def fake_run(script, *flags, watch=None):
        flags = [str(f) for f in flags]
        calls.append((script, flags))
        if '--defense' in flags and flags[flags.index('--defense') + 1] == config.TEACHER_KEY:  # the teacher: built
            # once, as a file, before NAD and ARGD
            open(flags[flags.index('--output') + 1], 'wb').close()
        return {'ACC': 1.0, 'ASR': 2.0, 'RA': 3.0}, 1.0
    monkeypatch.setattr(table, 'run', fake_run)
    args = parse_args('benchmark.py', ['--data_root', 'd', '--end_to_end', '--s_model', str(tmp_path / 'bd.tar')])
    timed = list(benchmark.defense_wall_times(args))
    assert [name for name, _, _ in timed] == [d['label'] for k, d in COLUMNS.items() if k not in ('none', 'floor')]
    assert {script for script, _ in calls} == {'main_ft.py'}  # the one driver of every defense
    assert [f[f.index('--defense') + 1] for _, f in calls] == [k for k in COLUMNS if k not in ('none', 'floor')]
    assert all(flags[flags.index('--s_model') + 1] == str(tmp_path / 'bd.tar') for _, flags in calls)
    assert not any(script == 'retune.py' for script, _ in calls)  # wall times of the defenses alone


def test_per_class_columns_show_the_lowest_class_and_the_small_ones():
    from run_table import class_columns
    seeds = [[90.0, 40.0, 80.0, 70.0], [90.0, 60.0, 40.0, 70.0]]  # class means 90, 50, 60, 70
    assert class_columns(seeds, ()) == ['50.0 (1)']
    assert class_columns(seeds, (2, 3)) == ['50.0 (1)', '60.0 / 70.0']
    assert class_columns([], (0,)) == ['–', '–']


def test_the_robustness_picture_never_averages_two_models_of_one_attack():
    from plot_curves import read_robustness
    cell = lambda key, asr, path='[100.0, 2.0]', defense='ft', attack='trojan': dict(
        attack=attack, settings_key=key, defense=defense, ASR=asr, ASR_retuned='1.0', path_ASR=path)
    got = read_robustness([cell('old', '4.0', '[100.0, 4.0]'), cell('new', '2.0'), cell('new', '3.0', '[100.0, 3.0]')])
    assert got == {'trojan [old]': {'FT': (4.0, 1.0, [100.0, 4.0], None)},
                   'trojan [new]': {'FT': (2.5, 1.0, [100.0, 2.5], None)}}
    curved = dict(cell('new', '2.0', defense='mcr'), curve_ASR='[100.0, 50.0, 1.0]')  # MCR's curve, averaged as the path
    got = read_robustness([curved, dict(curved, curve_ASR='[100.0, 30.0, 3.0]')])
    assert got == {'trojan': {'MCR': (2.0, 1.0, [100.0, 2.0], [100.0, 40.0, 2.0])}}
    assert list(read_robustness([cell('new', '2.0')])) == ['trojan']
    # no empty panels: a model whose cells kept no path (a lost file), a row with only the undefended model
    lost, control = cell('lost', '3.0', path=''), cell('c', '1.0', path='', defense='none', attack='clean')
    assert list(read_robustness([lost, control, cell('new', '2.0')])) == ['trojan']


def test_a_row_trained_here_is_keyed_by_its_content(tmp_path, monkeypatch):
    """Retraining a row's model (other code, another float order) gives other cells, never the old key."""
    import table
    from cli import parse_args
    trainings = []

    def fake_run(script, *flags, watch=None):
        flags = [str(f) for f in flags]
        trainings.append(script)
        with open(flags[flags.index('--output') + 1], 'wb') as f:
            f.write(f'model {len(trainings)}'.encode())
        return {'ACC': 1.0}, 1.0
    monkeypatch.setattr(table, 'run', fake_run)
    monkeypatch.chdir(tmp_path)
    (tmp_path / 'x.npz').write_bytes(b'a pattern')
    args = parse_args('run_table.py', ['--data_root', 'd', '--trojan_pattern', 'x.npz', '--checkpoint_root', tmp_path])
    first = table.cell_settings(args, 'trojan')
    assert trainings == ['train_badnet.py'] and table.cell_settings(args, 'trojan') == first  # built once
    path, _ = table.row_model(args, 'trojan')
    os.remove(path)
    again = table.cell_settings(args, 'trojan')
    assert len(trainings) == 2 and table.short_hash(again) != table.short_hash(first)
    assert {k: v for k, v in again.items() if k != 'model'} == {k: v for k, v in first.items() if k != 'model'}


@pytest.mark.slow
def test_a_rerun_with_another_ratio_makes_new_cells_and_leaves_the_old_ones(backdoored, image_folder, tmp_path):
    flags = table_flags(backdoored, image_folder, tmp_path)
    flags[flags.index('--defenses') + 1] = 'none,ft'
    r = run_script('run_table.py', *flags)
    assert r.returncode == 0, r.stderr
    cells = tmp_path / 'results' / 'cells'
    first = {p.name: p.read_bytes() for p in cells.glob('*.json')}
    flags[flags.index('--ratio') + 1] = 0.25
    r = run_script('run_table.py', *flags)
    assert r.returncode == 0 and len(r.stdout.strip().splitlines()) == 2, r.stdout  # both cells run again
    after = {p.name: p.read_bytes() for p in cells.glob('*.json')}
    assert len(first) == 2 and len(after) == 4 and all(after[name] == data for name, data in first.items())
    ratios = sorted({json.loads(data)['settings']['ratio'] for data in after.values()})
    assert ratios == [0.25, 0.5]
    table = (tmp_path / 'results' / 'table.md').read_text()
    assert table.count('**badnet** [') == 2 and '"ratio": 0.25' in table and '"ratio": 0.5' in table


def test_workers_share_the_cores_unless_threads_is_given(monkeypatch, tmp_path):
    """--workers N: N processes with cores // N threads each (N of torch's default would oversubscribe)."""
    import subprocess as sp

    import run_table
    from cli import parse_args
    started = []

    class Done:
        def __init__(self, cmd):
            started.append([str(c) for c in cmd])

        def wait(self):
            return 0
    monkeypatch.setattr(sp, 'Popen', Done)
    monkeypatch.setattr(os, 'cpu_count', lambda: 16)
    monkeypatch.setattr(sys, 'argv', ['run_table.py', '--workers', '8', '--table_dir', str(tmp_path)])
    run_table.start_workers(parse_args('run_table.py', sys.argv[1:]), 8)
    assert len(started) == 8 and all(c[c.index('--threads') + 1] == '2' and c[-2:] == ['--workers', '1'] for c in started)
    started.clear()
    monkeypatch.setattr(sys, 'argv', ['run_table.py', '--workers', '2', '--threads', '1'])
    run_table.start_workers(parse_args('run_table.py', sys.argv[1:]), 2)
    assert all(c.count('--threads') == 1 and c[c.index('--threads') + 1] == '1' for c in started)


def test_an_edited_recipe_makes_its_cell_run_again_and_hides_the_old_one(monkeypatch, tmp_path):
    """A cell is keyed by its defense's resolved recipe: an edit of its entry in config.py runs it anew (the old
    cell stays in its file, out of table.md); the other columns keep theirs."""
    import run_table
    import table
    from cli import parse_args
    runs = []

    def fake_run(script, *flags, watch=None):
        flags = [str(f) for f in flags]
        runs.append(flags[flags.index('--defense') + 1] if '--defense' in flags else script)
        return {'ACC': 80.0 + len(runs), 'ACC_all': 1.0, 'ACC_target': 1.0, 'ASR': 2.0, 'RA': 3.0}, 1.0
    monkeypatch.setattr(table, 'run', fake_run)
    (tmp_path / 'w' / 'zoo').mkdir(parents=True)
    (tmp_path / 'w' / 'zoo' / 'badnet.tar').write_bytes(b'a model')
    args = parse_args('run_table.py', ['--data_root', 'd', '--checkpoint_root', tmp_path / 'w', '--table_dir',
                                       tmp_path / 'results', '--skip_retune'])
    cells = [('badnet', 'fst', 0), ('badnet', 'none', 0)]
    run_table.work_through(args, cells)
    run_table.work_through(args, cells)
    assert runs == ['fst', 'evaluate.py']  # each once
    monkeypatch.setitem(config.DEFENSES['fst'], 'alpha', 0.2)
    run_table.work_through(args, cells)
    assert runs == ['fst', 'evaluate.py', 'fst']  # only the edited defense's cell again
    files = sorted(p.name for p in (tmp_path / 'results' / 'cells').glob('badnet-fst-s0-*.json'))
    assert len(files) == 2 and files[0].split('-')[-1] != files[1].split('-')[-1]
    md = (tmp_path / 'results' / 'table.md').read_text()
    assert '| FST | 83.00 |' in md and '| FST | 81.00 |' not in md and 'Not shown: 1 cells' in md
    recipes = sorted(p.name for p in (tmp_path / 'results' / 'recipes').glob('fst-*.json'))
    assert len(recipes) == 2 and any('"alpha": 0.2' in (tmp_path / 'results' / 'recipes' / r).read_text()
                                     for r in recipes)
