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


CHOICES = [(script, defense) for script in sorted(cli.SCRIPTS)
           for defense in (cli.defenses_of(script) if script in config.DEFAULT_DEFENSE else [None])]


@pytest.mark.parametrize('script,defense', CHOICES)
def test_every_option_default_comes_from_config_and_an_edit_there_reaches_the_parser(script, defense, monkeypatch):
    """Each option's default is in exactly one place: the chosen defense's entry (config.DEFENSES), the
    teacher's (FT's entry), or one config.py group; an option only other defenses have is None."""
    argv = ['--defense', defense] if defense and script != 'train_teacher.py' else []
    parser = cli.get_arguments(script, defense=defense)
    options = [(a.dest, a.type) for a in parser._actions if a.option_strings and a.dest not in ('help', 'defense')]
    others = set().union(*(config.DEFENSES[d] for d in cli.defenses_of(script))) if defense else set()
    for name, kind in options:
        if defense and name in config.DEFENSES[defense]:
            owner = config.DEFENSES[defense]
        elif name in cli.TEACHER_OPTIONS:
            owner = config.DEFENSES['ft']
        elif name in others:  # another defense's option: not used by this one
            assert getattr(cli.get_arguments(script, defense=defense).parse_args(argv), name) is None, name
            continue
        else:
            owners = [g for g in cli.SCRIPTS[script][1] if name in g]
            assert len(owners) == 1, f'{script} --{name}: its default must be in exactly one config.py group'
            owner = owners[0]
        monkeypatch.setitem(owner, name, changed(owner[name], kind))
        assert getattr(cli.get_arguments(script, defense=defense).parse_args(argv), name) == owner[name], name


def test_no_defense_entry_takes_a_shared_option_from_the_others():
    """An option every defense of a script reads from a config.py group (--adv_share) set in one entry would be
    that entry's own, and so None ('not used') for the others: such a key is in every entry of the script or in none."""
    for script in config.DEFAULT_DEFENSE:
        entries = [config.DEFENSES[d] for d in cli.defenses_of(script)]
        shared = set().union(*cli.SCRIPTS[script][1])
        for key in set().union(*entries) & shared:
            assert all(key in e for e in entries), (script, key)
        for d in cli.defenses_of(script):
            args = cli.parse_args(script, ['--defense', d] if script != 'train_teacher.py' else [])
            for k, v in config.DEFENSE.items():  # the shared defense options: what config.py says, for every defense
                assert v is None or getattr(args, k, v) is not None, (script, d, k)


def test_help_shows_the_values_the_chosen_defense_runs_with():
    """PAM runs with momentum 0.1: --help says so, and the parsed value is it (no override after parsing)."""
    text = ' '.join(cli.get_arguments('main_ft.py').format_help().split())
    assert 'SGD momentum (default for pam: 0.1)' in text and '(default for pam: 30)' in text
    assert cli.parse_args('main_ft.py', []).momentum == 0.1
    fst = cli.parse_args('main_ft.py', ['--defense', 'fst'])
    assert (fst.momentum, fst.epochs, fst.batch_size, fst.alpha, fst.rho) == (0.9, 10, 128, 0.1, None)
    fst_help = ' '.join(cli.get_arguments('main_ft.py', defense='fst').format_help().split())
    assert 'SGD momentum (default for fst: 0.9)' in fst_help and '(not used by fst)' in fst_help
    nad = cli.parse_args('main-ARGD.py', ['--defense=nad'])
    assert (nad.epochs, nad.beta1, nad.vert_weights) == (20, 500, None)
    assert cli.parse_args('main-ARGD.py', ['--defense', 'argd-si']).source == 'inverted'
    assert cli.parse_args('main_mcl.py', ['--defense', 'mcl-tk']).keep_target is True
    assert cli.parse_args('main_ft.py', ['--defense', 'pam', '--momentum', '0.5']).momentum == 0.5  # a flag wins
    with pytest.raises(cli.UserError, match="unknown defense 'argd'"):
        cli.parse_args('main_ft.py', ['--defense', 'argd'])


def test_every_registered_defense_runs_from_its_entry():
    """One entry per defense: its script offers it, the table has it as a column, and every recipe key that is
    one of the script's options is the value the parsed command line holds."""
    import table
    for key, entry in config.DEFENSES.items():
        script = entry['script']
        assert key in cli.defenses_of(script) and key in table.COLUMNS and entry['label'] == table.COLUMNS[key]['label']
        assert os.path.exists(os.path.join(ROOT, 'defenses', entry['module'] + '.py')), key
        args = cli.parse_args(script, [] if script == 'train_teacher.py' else ['--defense', key])
        for name, value in entry.items():
            if hasattr(args, name) and name != 'vert_weights':  # parsed into a list of numbers
                assert getattr(args, name) == value, (key, name)
    assert list(table.COLUMNS) == ['none', *config.DEFENSES, 'floor']
    assert table.BLIND == tuple(k for k in config.DEFENSES if k not in ('mcl', 'mcl-tk'))


def test_a_flag_beats_the_checkpoint_meta_which_beats_config():
    from checkpoints import resolve
    args = cli.parse_args('evaluate.py', ['--arch', 'WRN-10-1'])
    assert resolve(args, 'arch', 'ResNet18') == 'WRN-10-1'          # given on the command line
    assert resolve(args, 'num_class', 43) == 43                     # meta
    assert resolve(args, 'trigger_type', None) == config.ATTACK['trigger_type']  # neither: config.py


def test_editing_config_py_reaches_the_script_itself(tmp_path):
    """Copy the project, change one default in config.py as a user would, and ask the script."""
    work = tmp_path / 'project'
    shutil.copytree(ROOT, work, ignore=shutil.ignore_patterns('tests', 'weight', 'results', '.git', '*.pyc'))
    text = (work / 'config.py').read_text()
    marker = "    epochs=20,                 # MCL erasing epochs\n    lr=0.1,"
    assert marker in text
    (work / 'config.py').write_text(text.replace(marker, marker.replace('lr=0.1', 'lr=0.037')))
    r = run_script(str(work / 'main_mcl.py'), '--help')
    assert r.returncode == 0, r.stderr
    assert '(default for mcl: 0.037)' in ' '.join(r.stdout.split()), r.stdout


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
