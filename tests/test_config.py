"""config.py is the one place for defaults, and each script parses only its own options."""
import os
import shutil

import pytest

import config
from conftest import ROOT, run_script


def test_a_default_edited_in_config_changes_what_the_script_parses(monkeypatch):
    assert config.parse_args('main-ARGD.py', []).lr == 0.1
    monkeypatch.setitem(config.SCRIPT_DEFAULTS['main-ARGD.py'], 'lr', 0.05)
    assert config.parse_args('main-ARGD.py', []).lr == 0.05
    assert config.parse_args('main-ARGD.py', ['--lr', '0.2']).lr == 0.2  # a flag still overrides it


def test_editing_config_py_reaches_the_script_itself(tmp_path):
    """Copy the project, change one default in config.py as a user would, and ask the script."""
    work = tmp_path / 'project'
    shutil.copytree(ROOT, work, ignore=shutil.ignore_patterns('tests', 'weight', 'results', '.git', '*.pyc'))
    text = (work / 'config.py').read_text()
    marker = "        epochs=20,\n        batch_size=64,\n        lr=0.1,              # MCL"
    assert marker in text
    (work / 'config.py').write_text(text.replace(marker, marker.replace('lr=0.1', 'lr=0.037')))
    r = run_script(str(work / 'main_mcl.py'), '--help')
    assert r.returncode == 0, r.stderr
    assert '(default: 0.037)' in ' '.join(r.stdout.split()), r.stdout


@pytest.mark.parametrize('script,has,lacks', [
    ('main-ARGD.py', ['--beta3', '--vert_weights', '--t_model', '--cutout', '--train_projections'],
     ['--inv_epochs', '--recipe', '--attacks', '--model ']),
    ('main_mcl.py', ['--inv_epochs', '--temperature', '--s_model'], ['--beta1', '--t_model', '--recipe']),
    ('train_badnet.py', ['--recipe', '--inject_portion', '--epochs'], ['--s_model', '--ratio', '--beta1']),
    ('train_teacher.py', ['--teacher_epochs', '--teacher_lr'], ['--epochs', '--lr ', '--beta1', '--inv_epochs']),
    ('evaluate.py', ['--model', '--target_label'], ['--epochs', '--lr ', '--ratio']),
])
def test_help_lists_only_the_options_a_script_reads(script, has, lacks):
    text = config.get_arguments(script).format_help() + ' '
    for option in has:
        assert option in text, option
    for option in lacks:
        assert option not in text, option


def test_every_script_has_an_entry():
    scripts = {f for f in os.listdir(ROOT) if f.endswith('.py') and os.path.exists(os.path.join(ROOT, f))
               and 'parse_args(' in open(os.path.join(ROOT, f)).read() and f != 'config.py'}
    assert scripts <= set(config.SCRIPTS) == set(config.SCRIPT_DEFAULTS)
