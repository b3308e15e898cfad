"""On a CUDA GPU (skipped without one): every script for a short run on `cuda`, a kill + --resume on
`cuda`, checkpoints written there that load on a CPU-only machine, and run_table.py with two workers
on two GPUs when there are two. The CPU fakes of the same defects are in test_devices.py."""
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import ROOT, run_script, summary, tensors_in, toy_flags
from defenses import registry

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not torch.cuda.is_available(), reason='no CUDA GPU here')]


def common(image_folder, tmp_path):
    return ['--dataset', 'ImageFolder', '--data_root', image_folder, '--device', 'cuda', '--log_root', tmp_path / 'logs',
            '--batch_size', 32]


def all_on_cpu(path):
    """Every tensor of the file, loaded with a plain torch.load (no map_location), is a CPU tensor."""
    return all(t.device.type == 'cpu' for t in tensors_in(torch.load(path, weights_only=True)))

@pytest.fixture(scope='module')
def cuda_model(image_folder, tmp_path_factory):
    d = tmp_path_factory.mktemp('cuda')
    out = d / 'wanet.tar'  # WaNet: its grid in the meta, per-batch poisoning on the device
    r = run_script('train_badnet.py', *common(image_folder, d), '--arch', 'WRN-10-1', '--epochs', 2,
                   '--trigger_type', 'wanetTrigger', '--output', out, '--compile', 'auto')
    assert r.returncode == 0, r.stderr
    first = r.stdout.splitlines()[0]
    capability = torch.cuda.get_device_capability()
    assert ('fp32 on TF32' if capability >= (8, 0) else 'fp16 autocast' if capability >= (7, 0) else 'fp32') in first
    assert 'torch.compile off' in r.stdout  # auto: eager on CUDA
    return out


def test_a_checkpoint_written_on_cuda_loads_on_a_cpu_only_machine(cuda_model):
    assert all_on_cpu(cuda_model)


@pytest.mark.parametrize('key', list(registry()))
def test_every_defense_runs_on_cuda_and_writes_cpu_checkpoints(cuda_model, image_folder, tmp_path, key):
    out = tmp_path / 'out.tar'
    r = run_script('main_ft.py', *common(image_folder, tmp_path), '--s_model', cuda_model, '--ratio', 0.5,
                   '--checkpoint_root', tmp_path / 'w', '--output', out, *toy_flags(key, epochs=1))
    assert r.returncode == 0, r.stderr
    assert 0 <= summary(r.stdout)['ACC'] <= 100 and all_on_cpu(out)
    for teacher in (tmp_path / 'w' / 't_net').glob('*.tar'):
        assert all_on_cpu(teacher)


def test_mcl_detects_the_target_on_cuda(backdoored, image_folder, tmp_path):
    """Blind detection on a model whose backdoor it finds on the CPU (the 2-epoch WaNet toy has none: ASR 0),
    then erasing, on cuda."""
    out = tmp_path / 'out.tar'
    r = run_script('main_mcl.py', *common(image_folder, tmp_path), '--s_model', backdoored['path'], '--ratio', 0.5,
                   '--checkpoint_root', tmp_path / 'w', '--output', out, '--epochs', 1, '--detect_epochs', 8,
                   '--inv_epochs', 20, '--inv_patience', 6)
    assert r.returncode == 0, r.stderr
    assert 'detected target label: 0' in r.stdout, r.stdout
    assert all_on_cpu(out) and torch.load(out, weights_only=True)['meta']['mcl']['target_label'] == 0


@pytest.mark.parametrize('script, flags', [('evaluate.py', []), ('retune.py', ['--epochs', 1]),
                                           ('interpolate.py', ['--points', 3])])
def test_the_scoring_scripts_run_on_cuda(cuda_model, image_folder, tmp_path, script, flags):
    extra = ['--from', cuda_model] if script == 'interpolate.py' else []
    r = run_script(script, '--dataset', 'ImageFolder', '--data_root', image_folder, '--device', 'cuda',
                   '--model', cuda_model, *extra, *flags)
    assert r.returncode == 0, r.stderr


def test_kill_and_resume_on_cuda(image_folder, tmp_path):
    """--deterministic: the resumed run equals the uninterrupted one on one GPU too."""
    def flags(out):
        return [*common(image_folder, tmp_path), '--arch', 'WRN-10-1', '--epochs', 6, '--output', out,
                '--compile', 'off', '--deterministic', '--seed', 1]
    a, b = tmp_path / 'a.tar', tmp_path / 'b.tar'
    r = run_script('train_badnet.py', *flags(a))
    assert r.returncode == 0, r.stderr
    p = subprocess.Popen([sys.executable, os.path.join(ROOT, 'train_badnet.py'), *map(str, flags(b))],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not os.path.exists(str(b) + '.resume') and time.time() < deadline:
        time.sleep(0.02)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert os.path.exists(str(b) + '.resume') and not b.exists()
    r = run_script('train_badnet.py', *flags(b), '--resume')
    assert r.returncode == 0, r.stderr
    assert 'resuming badnet after epoch' in r.stdout
    sa, sb = torch.load(a, weights_only=True)['state_dict'], torch.load(b, weights_only=True)['state_dict']
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason='needs two GPUs')
def test_run_table_with_two_workers_on_two_gpus(cuda_model, image_folder, tmp_path):
    import shutil
    (tmp_path / 'w' / 'zoo').mkdir(parents=True)
    shutil.copy(cuda_model, tmp_path / 'w' / 'zoo' / 'wanet.tar')
    r = run_script('run_table.py', '--dataset', 'ImageFolder', '--data_root', image_folder, '--attacks', 'wanet',
                   '--defenses', 'none,ft,ft-at', '--seeds', '0,1', '--ratio', 0.5, '--workers', 2, '--skip_retune',
                   '--checkpoint_root', tmp_path / 'w', '--table_dir', tmp_path / 'results')
    assert r.returncode == 0, r.stderr
    assert len(list((tmp_path / 'results' / 'cells').glob('*.json'))) == 6


def test_cuda_graphs_replay_the_eager_training_steps(monkeypatch):
    """--cuda_graphs on, the real captures (test_cuda_graphs.py checks the routing on the CPU): steps through
    train_epoch with a features call, a plain call and a ragged last batch, then evaluation, match the eager
    run (the same kernels replayed; cuDNN's deterministic ones here, so the choice of kernel cannot differ),
    and every call after the captures is a replay."""
    import copy
    import types

    import cuda_graphs
    import device
    from metrics import predict
    from models import select_model
    from test_cuda_graphs import train_both
    monkeypatch.setattr(torch.backends.cudnn, 'deterministic', True)
    monkeypatch.setattr(torch.backends.cudnn, 'benchmark', False)
    dev = torch.device('cuda')
    torch.manual_seed(0)
    model = device.prepare_model(select_model('WRN-10-1', 4), dev)
    plain = copy.deepcopy(model)
    cuda_graphs.install(model, dev, types.SimpleNamespace(cuda_graphs='on', amp=False, world_size=1))
    g = torch.Generator().manual_seed(2)
    batches = [(torch.rand(n, 3, 32, 32, generator=g).to(dev, memory_format=torch.channels_last),
                torch.randint(0, 4, (n,), generator=g).to(dev)) for n in (16, 16, 16, 7)]

    train_both(model, plain, batches, epochs=3)
    router = model.forward
    assert len(router.graphs) == 4 and router.eager_calls == 0
    for (k, a), b in zip(model.state_dict().items(), plain.state_dict().values()):
        assert torch.allclose(a.float(), b.float(), rtol=1e-4, atol=1e-5), k
    x = torch.randint(0, 256, (2500, 32, 32, 3), dtype=torch.uint8, device=dev)
    norm = lambda u: u.permute(0, 3, 1, 2).float().div(255)
    model.eval(), plain.eval()
    agree = (predict(model, x, norm, 1000) == predict(plain, x, norm, 1000)).float().mean().item()
    assert agree >= 0.99 and len(router.graphs) == 6  # eval batches of 1000 and the last 500


def test_a_defense_with_cuda_graphs_on_runs_as_without(cuda_model, image_folder, tmp_path):
    runs = {}
    for graphs in ('on', 'off'):
        r = run_script('main-ARGD.py', *common(image_folder, tmp_path), '--s_model', cuda_model, '--ratio', 0.5,
                       '--checkpoint_root', tmp_path / graphs, '--output', tmp_path / f'{graphs}.tar', '--epochs', 2,
                       '--teacher_epochs', 1, '--deterministic', '--cuda_graphs', graphs)
        assert r.returncode == 0, r.stderr
        assert 'CUDA graphs' not in r.stdout  # no fallback line, no autocast note: fp32 on the GPU
        runs[graphs] = summary(r.stdout)
    assert all(abs(runs['on'][k] - runs['off'][k]) <= 4 for k in runs['on'])
