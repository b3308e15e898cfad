"""run_table.py fills every cell once and skips finished cells on the next call; plot_curves.py draws them."""
import csv
import shutil

import pytest

from conftest import run_script


def test_table_fills_each_cell_once_and_resumes(backdoored, image_folder, tmp_path):
    (tmp_path / 'w' / 'table').mkdir(parents=True)
    shutil.copy(backdoored['path'], tmp_path / 'w' / 'table' / 'badnet.tar')  # reused, not retrained
    flags = ['--dataset', 'ImageFolder', '--data_root', image_folder, '--attacks', 'badnet', '--ratio', 0.5,
             '--checkpoint_root', tmp_path / 'w', '--table_dir', tmp_path / 'results']
    r = run_script('run_table.py', *flags)
    assert r.returncode == 0, r.stderr
    assert 'training the backdoored model' not in r.stdout
    with open(tmp_path / 'results' / 'table.csv') as f:
        rows = list(csv.DictReader(f))
    assert [(row['attack'], row['defense']) for row in rows] == [('badnet', d) for d in
                                                                  ('none', 'ft', 'nad', 'argd', 'mcl')]
    assert float(rows[0]['ASR']) == backdoored['metrics']['ASR']
    assert all(float(row['ASR']) < float(rows[0]['ASR']) for row in rows[1:]), rows  # every defense lowers it
    table = (tmp_path / 'results' / 'table.md').read_text()
    assert '| badnet |' in table and '—' not in table  # every cell filled

    again = run_script('run_table.py', *flags)
    assert again.returncode == 0 and again.stdout.strip() == '', again.stdout
    with open(tmp_path / 'results' / 'table.csv') as f:
        assert list(csv.DictReader(f)) == rows

    pytest.importorskip('matplotlib', reason='plot_curves.py needs the optional matplotlib')
    p = run_script('plot_curves.py', '--table_dir', tmp_path / 'results')
    assert p.returncode == 0, p.stderr
    assert (tmp_path / 'results' / 'curves_badnet.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
    assert 'FT, NAD, ARGD, MCL' in p.stdout


def test_table_rejects_an_unknown_attack(tmp_path):
    r = run_script('run_table.py', '--attacks', 'badnet,ghost', '--table_dir', tmp_path / 'results', cwd=tmp_path)
    assert r.returncode == 2 and r.stderr.strip() == "error: unknown attack 'ghost' (choose from badnet, blend, sig, wanet)"
    assert list(tmp_path.iterdir()) == []
