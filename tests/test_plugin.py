"""Adding a defense is what the README's "Adding a defense" says: its file in defenses/ (here a copy of FST's
under a new key) and an entry of numbers in config.DEFENSES, no other file edited; it then runs through
main_ft.py (and its --help), a run_table.py cell and benchmark.py --end_to_end."""
import csv
import shutil

import pytest

from conftest import ROOT, run_script, summary

FST_KEYS = "KEYS = {'fst': dict(label='FST')}"


def add_a_defense(work):
    """A copy of the project with FST copied under the key fst-copy, as the README says."""
    shutil.copytree(ROOT, work, ignore=shutil.ignore_patterns('tests', 'weight', 'results', '.git', '*.pyc',
                                                              '__pycache__'))
    text = (work / 'defenses' / 'fst.py').read_text()
    assert FST_KEYS in text
    (work / 'defenses' / 'fst_copy.py').write_text(text.replace(FST_KEYS, "KEYS = {'fst-copy': dict(label='FST copy')}"))
    with open(work / 'config.py', 'a') as f:
        f.write("DEFENSES['fst-copy'] = dict(DEFENSES['fst'], alpha=0.2)  # FST, its head pushed twice as hard\n")


@pytest.mark.slow
def test_a_defense_added_as_the_readme_says_runs_through_every_script(backdoored, image_folder, tmp_path):
    work = tmp_path / 'project'
    add_a_defense(work)
    data = ['--dataset', 'ImageFolder', '--data_root', image_folder, '--ratio', 0.5]

    h = run_script(str(work / 'main_ft.py'), '--defense', 'fst-copy', '--help')
    assert h.returncode == 0, h.stderr
    assert '(default for fst-copy: 0.2)' in ' '.join(h.stdout.split()), h.stdout

    r = run_script(str(work / 'main_ft.py'), '--defense', 'fst-copy', '--s_model', backdoored['path'], *data,
                   '--epochs', 2, '--batch_size', 32, '--checkpoint_root', tmp_path / 'w', '--log_root', tmp_path / 'logs')
    assert r.returncode == 0, r.stderr
    assert (tmp_path / 'w' / 'fst-copy_net' / 'bd.tar').exists() and (tmp_path / 'logs' / 'fst-copy_bd.csv').exists()
    assert 0 <= summary(r.stdout)['ASR'] <= 100

    (tmp_path / 'table' / 'zoo').mkdir(parents=True)
    shutil.copy(backdoored['path'], tmp_path / 'table' / 'zoo' / 'badnet.tar')
    t = run_script(str(work / 'run_table.py'), *data, '--attacks', 'badnet', '--defenses', 'fst-copy', '--skip_retune',
                   '--checkpoint_root', tmp_path / 'table', '--table_dir', tmp_path / 'results')
    assert t.returncode == 0, t.stderr
    with open(tmp_path / 'results' / 'table.csv') as f:
        assert [(row['attack'], row['defense']) for row in csv.DictReader(f)] == [('badnet', 'fst-copy')]
    assert '| FST copy' in (tmp_path / 'results' / 'table.md').read_text()  # its row (a warning may follow the label)

    b = run_script(str(work / 'benchmark.py'), '--end_to_end', '--no-pieces', '--defenses', 'fst-copy', '--s_model',
                   backdoored['path'], *data)
    assert b.returncode == 0, b.stderr
    assert 'FST copy end to end:' in b.stdout and 'images/s' not in b.stdout, b.stdout
