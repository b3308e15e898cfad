"""config.py is the one place for defaults, and each script parses only its own options."""
import os
import shutil

import pytest

import cli
import config
from conftest import ROOT, run_script


def changed(value, kind):
    """A different value of the same kind (the option's type where the default is None)."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, (int, float)):
        return value + 3
    if value is None:
        return kind(7) if kind in (int, float) else 'edited'
    return f'{value}-edited'


@pytest.mark.parametrize('script', sorted(cli.SCRIPTS))
def test_every_option_default_comes_from_config_and_an_edit_there_reaches_the_parser(script, monkeypatch):
    parser = cli.get_arguments(script)
    options = [(a.dest, a.type) for a in parser._actions if a.option_strings and a.dest != 'help']
    groups = cli.SCRIPTS[script][1]
    for name, kind in options:
        owners = [g for g in groups if name in g]
        assert len(owners) == 1, f'{script} --{name}: its default must be in exactly one config.py group'
        monkeypatch.setitem(owners[0], name, changed(owners[0][name], kind))
        assert getattr(cli.get_arguments(script).parse_args([]), name) == owners[0][name], name


def test_a_flag_beats_the_checkpoint_meta_which_beats_config():
    args = cli.parse_args('evaluate.py', ['--arch', 'WRN-10-1'])
    assert cli.resolve(args, 'arch', 'ResNet18') == 'WRN-10-1'          # given on the command line
    assert cli.resolve(args, 'num_class', 43) == 43                     # meta
    assert cli.resolve(args, 'trigger_type', None) == config.ATTACK['trigger_type']  # neither: config.py


def test_editing_config_py_reaches_the_script_itself(tmp_path):
    """Copy the project, change one default in config.py as a user would, and ask the script."""
    work = tmp_path / 'project'
    shutil.copytree(ROOT, work, ignore=shutil.ignore_patterns('tests', 'weight', 'results', '.git', '*.pyc'))
    text = (work / 'config.py').read_text()
    marker = "MAIN_MCL = dict(\n    epochs=20,                 # MCL erasing epochs\n    lr=0.1,"
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
    text = cli.get_arguments(script).format_help() + ' '
    for option in has:
        assert option in text, option
    for option in lacks:
        assert option not in text, option


def test_every_script_has_an_entry():
    scripts = {f for f in os.listdir(ROOT) if f.endswith('.py') and 'parse_args(' in open(os.path.join(ROOT, f)).read()
               and f not in ('cli.py',)}
    assert scripts == set(cli.SCRIPTS)


def test_config_is_numbers_not_machinery():
    import ast
    tree = ast.parse(open(os.path.join(ROOT, 'config.py')).read())
    assert all(isinstance(node, (ast.Assign, ast.Expr)) for node in tree.body)  # assignments and the docstring
