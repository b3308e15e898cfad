"""What a new user meets first: a shipped model never replaced by default, a teacher paired with its
own student, --help that shows every default, run_table.py options that reach every cell."""
import os
import shutil

import pytest
import torch

import table
from cli import get_arguments
from conftest import ROOT, run_script


def help_of(script, flag, defense=None):
    text = ' '.join(get_arguments(script, defense=defense).format_help().split('options:')[1].split())  # not the usage
    return text[text.index(flag + ' '):][:400]


@pytest.mark.parametrize('script, flag, defense, shown', [
    ('train_badnet.py', '--seed', None, '(default: 0)'), ('train_badnet.py', '--target_label', None, '(default: 0)'),
    ('main-ARGD.py', '--epochs', None, '(default for argd: 10)'), ('main-ARGD.py', '--epochs', 'nad', '(default for nad: 20)'),
    ('main-ARGD.py', '--defense', None, '{argd,ft,nad,mcl,mcl-tk,argd-si,ft-at,ft-si,pam,btidbf,pam-bti,fst,sau,fp,clp,anp,rnp,nc,i-bau,mcr,strip}'),
    ('main_ft.py', '--defense', None, '{pam,ft,nad,argd,mcl,mcl-tk,argd-si,ft-at,ft-si,btidbf,pam-bti,fst,sau,fp,clp,anp,rnp,nc,i-bau,mcr,strip} the'),
    ('main_ft.py', '--epochs', 'fst', '(default for fst: 10)'), ('main_ft.py', '--lr', 'sau', '(default for sau: 0.0001)')])
def test_help_shows_zero_and_per_defense_defaults(script, flag, defense, shown):
    assert shown in help_of(script, flag, defense)


def test_help_says_which_square_side_is_which():
    assert 'rows' in help_of('train_badnet.py', '--trig_w') and 'columns' in help_of('train_badnet.py', '--trig_h')


@pytest.mark.slow
def test_train_badnet_never_replaces_a_model_by_default(image_folder, tmp_path):
    shipped = tmp_path / 'w' / 's_net' / 'WRN-10-1.tar'
    shipped.parent.mkdir(parents=True)
    shipped.write_bytes(b'the shipped model')
    r = run_script('train_badnet.py', '--dataset', 'ImageFolder', '--data_root', image_folder, '--arch', 'WRN-10-1',
                   '--epochs', 1, '--batch_size', 32, '--compile', 'off', '--checkpoint_root', tmp_path / 'w',
                   '--log_root', tmp_path / 'logs', '--trigger_type', 'squareTrigger', '--seed', 4)
    assert r.returncode == 0, r.stderr
    assert shipped.read_bytes() == b'the shipped model'
    own = tmp_path / 'w' / 's_net' / 'WRN-10-1-squareTrigger-seed4.tar'
    assert own.exists() and f'--s_model {own}' in r.stdout


@pytest.mark.slow
def test_a_teacher_of_another_student_is_one_clear_line(backdoored, image_folder, tmp_path):
    flags = ['--dataset', 'ImageFolder', '--data_root', image_folder, '--ratio', 0.5, '--epochs', 1,
             '--teacher_epochs', 1, '--batch_size', 32, '--checkpoint_root', tmp_path / 'w', '--log_root', tmp_path]
    student = tmp_path / 'student.tar'
    shutil.copy(backdoored['path'], student)
    r = run_script('main-ARGD.py', '--s_model', student, *flags)  # fine-tunes the teacher, records the student
    assert r.returncode == 0, r.stderr
    teacher = tmp_path / 'w' / 't_net' / 'student.tar'
    made_from = torch.load(teacher, weights_only=True)['meta']['student']
    assert len(made_from) == 12
    ckpt = torch.load(student, weights_only=True)
    ckpt['state_dict']['fc.bias'] += 1  # retrained under the same name
    torch.save(ckpt, student)
    r = run_script('main-ARGD.py', '--s_model', student, *flags)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert 'was fine-tuned from another student' in r.stderr and made_from in r.stderr


def test_run_table_refuses_options_it_cannot_pass_on(tmp_path):
    for flag in (['--seed', 1], ['--json']):
        r = run_script('run_table.py', *flag, '--table_dir', tmp_path)
        assert r.returncode == 2 and 'run_table.py does not take' in r.stderr, r.stderr
    assert not os.listdir(tmp_path)


def test_run_table_passes_precision_and_eval_batch_size_to_every_cell():
    from cli import parse_args
    args = parse_args('run_table.py', ['--precision', 'fp32', '--eval_batch_size', 64, '--data_root', ROOT])
    flags = list(map(str, table.common_flags(args, 0)))
    assert flags[flags.index('--precision') + 1] == 'fp32' and flags[flags.index('--eval_batch_size') + 1] == '64'
    assert table.cell_settings(args, 'badnet')['precision'] == 'fp32'  # another precision: other cells
    auto = parse_args('run_table.py', ['--data_root', ROOT])
    assert 'precision' not in table.cell_settings(auto, 'badnet')  # the default keeps the cells' keys


def test_a_running_script_reports_each_line(backdoored, image_folder):
    seen = []
    metrics, _ = table.run('evaluate.py', '--model', backdoored['path'], '--dataset', 'ImageFolder',
                           '--data_root', image_folder, watch=seen.append)
    assert seen[0].startswith('evaluate.py: device') and metrics['ASR'] == backdoored['metrics']['ASR']
