"""Exact resume after SIGKILL, deterministic runs, and a NaN loss stopping the run."""
import csv
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from cli import parse_args
from conftest import ROOT, one_key_per_module, run_script, summary, toy_flags
from defenses import registry, tag_of


def badnet_args(image_folder, out, seed=1, epochs=4):
    return ['--dataset', 'ImageFolder', '--data_root', image_folder, '--arch', 'WRN-10-1', '--epochs', epochs,
            '--batch_size', 32, '--lr', 0.05, '--output', out, '--log_root', os.path.dirname(out), '--seed', seed,
            '--threads', 1, '--compile', 'off']


def rows(path, drop=('seconds',)):
    with open(path) as f:
        return [{k: v for k, v in r.items() if k not in drop} for r in csv.DictReader(f)]


@pytest.mark.slow
def test_kill_and_resume_is_bit_identical(image_folder, tmp_path):
    (tmp_path / 'a').mkdir()
    (tmp_path / 'b').mkdir()
    a, b = str(tmp_path / 'a' / 'm.tar'), str(tmp_path / 'b' / 'm.tar')
    r = run_script('train_badnet.py', *badnet_args(image_folder, a))
    assert r.returncode == 0, r.stderr

    cmd = [sys.executable, os.path.join(ROOT, 'train_badnet.py'), *map(str, badnet_args(image_folder, b))]
    p = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not os.path.exists(b + '.resume') and time.time() < deadline:  # epoch 1 done: now in epoch 2
        time.sleep(0.02)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert os.path.exists(b + '.resume') and not os.path.exists(b), 'the run was not killed mid-way'

    r = run_script('train_badnet.py', *badnet_args(image_folder, b), '--resume')
    assert r.returncode == 0, r.stderr
    assert 'resuming badnet after epoch' in r.stdout
    sa, sb = torch.load(a, weights_only=True)['state_dict'], torch.load(b, weights_only=True)['state_dict']
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    log = os.path.join(os.path.dirname(b), 'train_badnet_m.csv')
    assert [r['epoch'] for r in rows(log)] == ['1', '2', '3', '4']
    assert rows(log) == rows(os.path.join(os.path.dirname(a), 'train_badnet_m.csv'))
    assert not os.path.exists(b + '.resume')


@pytest.mark.slow
def test_seeds_decide_the_run(image_folder, tmp_path):
    logs = []
    for name, seed in (('s1', 1), ('s1b', 1), ('s2', 2)):
        (tmp_path / name).mkdir()
        out = str(tmp_path / name / 'm.tar')
        r = run_script('train_badnet.py', *badnet_args(image_folder, out, seed=seed, epochs=2))
        assert r.returncode == 0, r.stderr
        logs.append(rows(os.path.join(os.path.dirname(out), 'train_badnet_m.csv')))
    assert logs[0] == logs[1] and logs[0] != logs[2]


def test_nan_loss_stops_with_a_clear_message(image_folder, tmp_path):
    out = str(tmp_path / 'nan.tar')
    r = run_script('train_badnet.py', *badnet_args(image_folder, out, epochs=2), '--lr', '1e30')
    assert r.returncode == 2
    assert 'loss became NaN/inf in epoch 1' in r.stderr and 'Traceback' not in r.stderr
    assert not os.path.exists(out)


@pytest.mark.slow
def test_a_resume_with_another_trigger_is_refused_and_writes_nothing(image_folder, tmp_path):
    out = str(tmp_path / 'm.tar')
    cmd = [sys.executable, os.path.join(ROOT, 'train_badnet.py'), *map(str, badnet_args(image_folder, out, epochs=30))]
    p = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not os.path.exists(out + '.resume') and time.time() < deadline:
        time.sleep(0.02)
    p.send_signal(signal.SIGKILL)
    p.wait()
    before = {f: os.stat(tmp_path / f).st_mtime_ns for f in os.listdir(tmp_path)}
    r = run_script('train_badnet.py', *badnet_args(image_folder, out, epochs=30), '--resume',
                   '--trigger_type', 'blendedTrigger')
    assert r.returncode == 2, r.stdout
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and '--trigger_type gridTrigger, this run has blendedTrigger' in lines[0], r.stderr
    assert {f: os.stat(tmp_path / f).st_mtime_ns for f in os.listdir(tmp_path)} == before
    assert not os.path.exists(out)


@pytest.mark.slow
def test_the_bf16_path_runs_end_to_end_and_keeps_fp32_weights(image_folder, tmp_path):
    """The autocast code CUDA uses, run on the CPU whatever the CPU (--precision bf16 forces it; --device cpu:
    the thresholds are the CPU's, a GPU draws other random numbers)."""
    out = str(tmp_path / 'bf16.tar')
    r = run_script('train_badnet.py', *badnet_args(image_folder, out, epochs=3), '--precision', 'bf16', '--device', 'cpu')
    assert r.returncode == 0, r.stderr
    assert 'precision bf16 autocast' in r.stdout.splitlines()[0]
    ckpt = torch.load(out, weights_only=True)
    assert all(v.dtype in (torch.float32, torch.int64) for v in ckpt['state_dict'].values())
    assert ckpt['metrics']['ACC'] >= 60, ckpt['metrics']  # it learned: 4 colour classes, chance is 25
    r = run_script('main-ARGD.py', '--dataset', 'ImageFolder', '--data_root', image_folder, '--s_model', out,
                   '--ratio', 0.5, '--epochs', 1, '--teacher_epochs', 1, '--checkpoint_root', tmp_path / 'w',
                   '--log_root', tmp_path, '--batch_size', 32, '--precision', 'bf16', '--device', 'cpu')
    assert r.returncode == 0, r.stderr
    assert 'precision bf16 autocast' in r.stdout.splitlines()[0]
    erased = torch.load(tmp_path / 'w' / 'erasing_net' / 'bf16.tar', weights_only=True)
    assert all(v.dtype in (torch.float32, torch.int64) for v in erased['state_dict'].values())
    assert all(torch.isfinite(v).all() for v in erased['state_dict'].values() if v.is_floating_point())
    metrics = summary(r.stdout)
    assert metrics == {k: erased['metrics'][k] for k in metrics}  # the summary is the saved model's
    assert metrics['ACC'] >= 50, metrics  # one bf16 ARGD epoch keeps a working model (chance is 25)


# what resuming does not depend on, cut to keep the test short: NC's search runs before the first epoch and is kept
# in the resume state (to its own early stop, 1,000 passes at most, it tripled this test: 39 -> 110 s)
SHORTER = {'nc': ['--nc_epochs', 20]}


@pytest.mark.slow
@pytest.mark.parametrize('defense', one_key_per_module())
def test_a_killed_defense_resumes_bit_identical(defense, backdoored, image_folder, tmp_path):
    """A key of every defense module: ARGD's loss projections, PAM's PGD starts and path-aware point, FST's
    re-initialised head, SAU's and I-BAU's Adam state, NC's reverse-engineered triggers, MCL's inverted trigger
    and MCR's curve (its t per batch, its choice of the point) all resume."""
    def flags(out):
        return [*toy_flags(defense, epochs=12), *SHORTER.get(defense, []), '--dataset', 'ImageFolder', '--data_root', image_folder, '--s_model',
                backdoored['path'], '--ratio', 0.5, '--threads', 1, '--device', 'cpu', '--output', out, '--log_root',
                os.path.dirname(out), '--checkpoint_root', tmp_path / 'w',
                *(['--t_model', tmp_path / 'teacher.tar'] if 'teacher' in registry()[defense].needs else [])]
    (tmp_path / 'a').mkdir()
    (tmp_path / 'b').mkdir()
    a, b = str(tmp_path / 'a' / 'm.tar'), str(tmp_path / 'b' / 'm.tar')
    r = run_script('main_ft.py', *flags(a))
    assert r.returncode == 0, r.stderr
    p = subprocess.Popen([sys.executable, os.path.join(ROOT, 'main_ft.py'), *map(str, flags(b))], cwd=ROOT,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not os.path.exists(b + '.resume') and time.time() < deadline:
        time.sleep(0.02)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert os.path.exists(b + '.resume') and not os.path.exists(b), 'the run was not killed mid-way'
    r = run_script('main_ft.py', *flags(b), '--resume')
    assert r.returncode == 0, r.stderr
    assert f'resuming {tag_of(defense, parse_args("main_ft.py", flags(b)))} after epoch' in r.stdout
    sa, sb = torch.load(a, weights_only=True)['state_dict'], torch.load(b, weights_only=True)['state_dict']
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.slow
def test_continue_from_a_shorter_run_is_that_longer_run(image_folder, tmp_path):
    """Without momentum (the one state a final model drops) a model continued from its epoch 2 to 4 is the
    4-epoch run bit for bit; a recipe whose milestones scale with --epochs, or another option, is refused."""
    out = {n: str(tmp_path / f'{n}.tar') for n in ('long', 'short', 'on', 'mcl', 'refused')}
    nad = ['--recipe', 'nad', '--momentum', 0]
    for name, epochs, extra in (('long', 4, nad), ('short', 2, nad), ('mcl', 2, [])):
        r = run_script('train_badnet.py', *badnet_args(image_folder, out[name], epochs=epochs), *extra)
        assert r.returncode == 0, r.stderr
    r = run_script('train_badnet.py', *badnet_args(image_folder, out['on']), *nad, '--continue_from', out['short'])
    assert r.returncode == 0, r.stderr
    a, b = torch.load(out['long'], weights_only=True), torch.load(out['on'], weights_only=True)
    assert all(torch.equal(a['state_dict'][k], b['state_dict'][k]) for k in a['state_dict'])
    assert b['epoch'] == 4 and b['meta']['continued_from'] == dict(file='short.tar', epoch=2)
    assert [r['epoch'] for r in rows(str(tmp_path / 'train_badnet_on.csv'))] == ['3', '4']
    for model, extra, said in ((out['mcl'], [], "recipe mcl's lr schedule over 2 epochs"),
                               (out['short'], [*nad, '--lr', 0.1], '--lr 0.05, this run has 0.1'),
                               (out['long'], nad, 'trained 4 epochs: --epochs must be more')):
        r = run_script('train_badnet.py', *badnet_args(image_folder, out['refused']), *extra, '--continue_from', model)
        assert r.returncode == 2 and said in r.stderr and 'Traceback' not in r.stderr, r.stderr
        assert not os.path.exists(out['refused'])
