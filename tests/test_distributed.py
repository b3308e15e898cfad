"""train_badnet.py under torchrun: DistributedDataParallel with gloo on CPU, one set of files."""
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import ROOT, summary

TORCHRUN = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2']

pytestmark = pytest.mark.slow  # two processes train a model


def flags(image_folder, out):
    return ['--dataset', 'ImageFolder', '--data_root', image_folder, '--arch', 'WRN-10-1', '--epochs', 15,
            '--batch_size', 32, '--lr', 0.05, '--inject_portion', 0.3, '--trigger_type', 'squareTrigger',
            '--trig_w', 5, '--trig_h', 5, '--no_augment', '--seed', 1, '--device', 'cpu', '--threads', 1,
            '--output', out / 'bd.tar', '--log_root', out / 'logs', '--compile', 'off']


def torchrun(args, cwd, **kw):
    env = dict(os.environ, PYTHONUNBUFFERED='1', OMP_NUM_THREADS='1')
    return subprocess.Popen([*TORCHRUN, os.path.join(ROOT, 'train_badnet.py'), *map(str, args)], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def kill_all_with(text):
    """SIGKILL every process whose command line contains text."""
    for pid in filter(str.isdigit, os.listdir('/proc')):
        try:
            with open(f'/proc/{pid}/cmdline', 'rb') as f:
                if text.encode() in f.read():
                    os.kill(int(pid), signal.SIGKILL)
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            pass


def test_two_gloo_processes_learn_the_backdoor_and_write_one_set_of_files(image_folder, tmp_path):
    out = tmp_path / 'out'
    p = torchrun(flags(image_folder, out), cwd=tmp_path)
    stdout, stderr = p.communicate(timeout=600)
    assert p.returncode == 0, stderr
    m = summary(stdout)
    assert m['ACC'] >= 90 and m['ASR'] >= 90, stdout
    assert sum(line.startswith('ACC ') for line in stdout.splitlines()) == 1  # rank 0 speaks for the run
    assert sum('epoch  15/15' in line for line in stdout.splitlines()) == 1
    assert sorted(os.listdir(out)) == ['bd.tar', 'logs'] and os.listdir(out / 'logs') == ['train_badnet_bd.csv']
    assert len((out / 'logs' / 'train_badnet_bd.csv').read_text().splitlines()) == 16  # header + 15 epochs, once
    ckpt = torch.load(out / 'bd.tar', weights_only=True)
    assert ckpt['epoch'] == 15 and not any(k.startswith('module.') for k in ckpt['state_dict'])


def test_a_killed_distributed_run_resumes(image_folder, tmp_path):
    out = tmp_path / 'out'
    p = torchrun(flags(image_folder, out), cwd=tmp_path)
    state = out / 'bd.tar.resume'
    deadline = time.time() + 300
    while time.time() < deadline and not (state.exists() and
                                          torch.load(state, weights_only=True, map_location='cpu')['rows'][-1]['epoch'] >= 3):
        time.sleep(0.3)
    kill_all_with(str(out / 'bd.tar'))  # torchrun and its workers, which sit in sessions of their own
    p.communicate()
    assert state.exists() and not (out / 'bd.tar').exists()
    r = torchrun([*flags(image_folder, out), '--resume'], cwd=tmp_path)
    stdout, stderr = r.communicate(timeout=600)
    assert r.returncode == 0, stderr
    assert 'resuming badnet after epoch' in stdout and summary(stdout)['ASR'] >= 90, stdout
    assert not state.exists() and (out / 'bd.tar').exists()
    epochs = [line.split(',')[0] for line in (out / 'logs' / 'train_badnet_bd.csv').read_text().splitlines()[1:]]
    assert epochs == [str(e) for e in range(1, 16)]  # each epoch once
