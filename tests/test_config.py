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
    if isinstance(value, tuple):
        return (*value, 7)
    return f'{value}-edited'


# every defense script runs every defense: main_ft.py's cover them, the others are checked with their default
CHOICES = [(script, defense) for script in sorted(cli.SCRIPTS)
           for defense in (cli.defenses_of(script) if script == 'main_ft.py' else
                           [config.DEFAULT_DEFENSE[script]] if script in config.DEFAULT_DEFENSE else [None])]


@pytest.mark.parametrize('script,defense', CHOICES)
def test_every_option_default_comes_from_config_and_an_edit_there_reaches_the_parser(script, defense, monkeypatch):
    """Each option's default is in exactly one place: the chosen defense's entry (config.DEFENSES), the
    teacher's (its entry), or one config.py group."""
    argv = ['--defense', defense] if defense else []
    parser = cli.get_arguments(script, defense=defense)
    options = [(a.dest, a.type) for a in parser._actions if a.option_strings and a.dest not in ('help', 'defense')]
    for name, kind in options:
        if defense and name in config.DEFENSES[defense]:
            owner = config.DEFENSES[defense]
        elif defense and name in cli.TEACHER_OPTIONS:
            owner = config.DEFENSES[config.TEACHER_KEY]
        else:
            owners = [g for g in cli.SCRIPTS[script][1] if name in g]
            assert len(owners) == 1, f'{script} --{name}: its default must be in exactly one config.py group'
            owner = owners[0]
        monkeypatch.setitem(owner, name, changed(owner[name], kind))
        assert getattr(cli.get_arguments(script, defense=defense).parse_args(argv), name) == owner[name], name


def test_every_defense_reads_every_value_of_its_entry_through_a_flag():
    """No recipe value is read where no flag reaches it: every key of a defense's entry is one of its options."""
    for key, entry in config.DEFENSES.items():
        options = {a.dest for a in cli.get_arguments('main_ft.py', defense=key)._actions}
        assert set(entry) <= options, (key, sorted(set(entry) - options))


def test_help_shows_the_values_the_chosen_defense_runs_with():
    """PAM runs with momentum 0.1: --help says so, and the parsed value is it (no override after parsing)."""
    text = ' '.join(cli.get_arguments('main_ft.py').format_help().split())
    assert 'SGD momentum (default for pam: 0.1)' in text and '(default for pam: 30)' in text
    assert cli.parse_args('main_ft.py', []).momentum == 0.1
    fst = cli.parse_args('main_ft.py', ['--defense', 'fst'])
    assert (fst.momentum, fst.epochs, fst.batch_size, fst.alpha) == (0.9, 10, 128, 0.1)
    assert not hasattr(fst, 'rho')  # another defense's option: not an option of FST's run
    fst_help = ' '.join(cli.get_arguments('main_ft.py', defense='fst').format_help().split())
    assert 'SGD momentum (default for fst: 0.9)' in fst_help and '--rho' not in fst_help
    nad = cli.parse_args('main-ARGD.py', ['--defense=nad'])
    assert (nad.epochs, nad.beta1, getattr(nad, 'vert_weights', None)) == (20, 500, None)
    assert cli.parse_args('main-ARGD.py', ['--defense', 'argd-si']).source == 'inverted'
    assert cli.parse_args('main_mcl.py', ['--defense', 'mcl-tk']).keep_target is True
    assert cli.parse_args('main_ft.py', ['--defense', 'pam', '--momentum', '0.5']).momentum == 0.5  # a flag wins
    sau = cli.parse_args('main_ft.py', ['--defense', 'sau', '--no-augment', '--optimizer', 'sgd', '--schedule', 'step',
                                        '--milestones', '2,4', '--factors', '1,0.1,0.01'])
    assert (sau.augment, sau.optimizer, sau.milestones, sau.factors) == (False, 'sgd', (2, 4), (1, 0.1, 0.01))
    with pytest.raises(cli.UserError, match="unknown defense 'no-such'"):
        cli.parse_args('main_ft.py', ['--defense', 'no-such'])


def test_every_registered_defense_runs_from_its_entry():
    """One entry per defense module's key: every defense script offers it, the table has it as a column, and
    every value of its entry is the value the parsed command line holds."""
    import table
    from defenses import registry
    assert list(registry()) == list(config.DEFENSES)
    for key, entry in config.DEFENSES.items():
        assert registry()[key].filter or registry()[key].label == table.COLUMNS[key]['label']  # a filter: no column
        for script in config.DEFAULT_DEFENSE:
            assert key in cli.defenses_of(script)
        args = cli.parse_args('main_ft.py', ['--defense', key])
        for name, value in entry.items():
            if name != 'vert_weights':  # parsed into a list of numbers
                assert getattr(args, name) == value, (key, name)
    assert list(table.COLUMNS) == ['none', *(k for k in config.DEFENSES if not registry()[k].filter), 'floor']
    assert table.BLIND == tuple(k for k, spec in registry().items() if not spec.told and not spec.filter)


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
    ('main-ARGD.py', ['--vert_weights', '--t_model', '--cutout', '--train_projections'],
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


@pytest.mark.parametrize('key', list(config.DEFENSES))
def test_each_defense_refuses_a_bad_value_of_each_of_its_options_before_any_work(key):
    """Every registered defense's options (its module's and the groups it reads): a value under an option's least
    is one clear error, as are a zero batch, a ratio above one and an option only other defenses have."""
    parser = cli.get_arguments('main_ft.py', defense=key)
    for name, least in parser.minimums.items():
        flag = next(a.option_strings[0] for a in parser._actions if a.dest == name)
        with pytest.raises(cli.UserError, match=f'--{name} must be'):
            cli.parse_args('main_ft.py', ['--defense', key, flag, str(least - 1)])
    for argv, message in ((['--batch_size', '0'], '--batch_size must be >= 1'),
                          (['--ratio', '2'], r'--ratio must be in \(0, 1\]'),
                          (['--no_such_option', '1'], 'unrecognized arguments: --no_such_option')):
        if argv[0] not in parser._option_string_actions and 'no_such' not in argv[0]:
            continue  # a filter (STRIP) trains nothing: it has no batch size
        with pytest.raises(cli.UserError, match=message):
            cli.parse_args('main_ft.py', ['--defense', key, *argv])
