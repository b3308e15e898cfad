"""The GPU paths, checked on the CPU: what a GPU would change is faked (a capability query, a device
the state lands on, a missing compiler), so each defect found by reading the code fails here first."""
import os
import types

import pytest
import torch

import checkpoints
import device
import training
from batching import train_batches
from cli import UserError
from conftest import tensors_in
from data_loader import first_rank_first
from files import atomic_save
from poisoning import batch_poisoner, retune_set
from triggers import make_trigger


def fake_gpu(monkeypatch, capability, name='Fake GPU'):
    monkeypatch.setattr(torch.cuda, 'get_device_capability', lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, 'get_device_name', lambda device=None: name)

    def emulation_counts(*a, **k):
        raise AssertionError('is_bf16_supported counts emulation: it must not decide')
    monkeypatch.setattr(torch.cuda, 'is_bf16_supported', emulation_counts)


@pytest.mark.parametrize('capability, name, expect, said', [
    ((7, 5), 'Tesla T4', 'fp16', 'fp16 autocast'), ((7, 0), 'Tesla V100', 'fp16', 'fp16 autocast'),
    ((8, 0), 'A100', False, 'fp32 on TF32 tensor cores'), ((9, 0), 'H200', False, 'fp32 on TF32 tensor cores'),
    ((6, 1), 'GTX 1080', False, 'fp32 (')])
def test_auto_precision_picks_what_ran_fastest_on_the_gpu(monkeypatch, capability, name, expect, said):
    """TF32 GPUs: fp32 (bf16 autocast was 22% slower per step on an H200); 7.x: fp16; older: fp32."""
    fake_gpu(monkeypatch, capability, name)
    amp, why = device.pick_precision('auto', torch.device('cuda', 1))
    assert amp == expect and why.startswith(said)
    assert name in why if capability >= (7, 0) else 'neither' in why


def test_tf32_is_switched_on_for_cuda_runs(monkeypatch):
    before = torch.get_float32_matmul_precision()
    monkeypatch.setattr(torch.backends.cudnn, 'allow_tf32', False)
    try:
        device.use_tf32()
        assert torch.get_float32_matmul_precision() == 'high' and torch.backends.cudnn.allow_tf32
    finally:
        torch.set_float32_matmul_precision(before)  # the CPU tests after this one run in full fp32


def test_asked_precisions_and_fp16_on_the_cpu(monkeypatch):
    fake_gpu(monkeypatch, (7, 5))
    assert device.pick_precision('fp32', torch.device('cuda'))[0] is False
    assert device.pick_precision('bf16', torch.device('cuda'))[0] == 'bf16'  # asked for: emulated, but asked
    with pytest.raises(UserError, match='fp16 is for CUDA'):
        device.pick_precision('fp16', torch.device('cpu'))


def test_fp16_steps_go_through_a_grad_scaler_and_learn():
    """fp16 autocast with loss scaling (what a T4 gets): the scaler scales, steps and updates."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))
    x = torch.randn(256, 8)
    y = (x[:, 0] > 0).long()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    scaler = torch.amp.GradScaler('cpu', init_scale=2.0 ** 10)
    loss_fn = lambda xb, yb: torch.nn.functional.cross_entropy(model(xb), yb)
    first = training.train_epoch(model, opt, loss_fn, [(x, y)], 0.5, 'fp16', scaler=scaler)
    for _ in range(30):
        last = training.train_epoch(model, opt, loss_fn, [(x, y)], 0.5, 'fp16', scaler=scaler)
    assert last < first * 0.7, (first, last)
    assert scaler.state_dict()['scale'] > 0 and scaler._growth_tracker is not None


def test_autocast_dtypes():
    assert device.autocast(torch.device('cpu'), 'fp16').fast_dtype == torch.float16
    assert device.autocast(torch.device('cpu'), 'bf16').fast_dtype == torch.bfloat16
    assert not device.autocast(torch.device('cpu'), False)._enabled


def test_resume_state_is_read_onto_the_cpu_whatever_the_models_device(monkeypatch, tmp_path):
    """On a GPU the old code loaded the state onto the model's device, and set_rng_state refused the
    CUDA RNG tensor. Faked: a load onto any device but 'cpu' lands on the meta device."""
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    torch.manual_seed(123)
    rng = torch.get_rng_state()
    run_id = {'tag': 't', 'epochs': 2}
    path = str(tmp_path / 'm.tar.resume')
    atomic_save(checkpoints.on_cpu({'model': model.state_dict(), 'optimizer': opt.state_dict(), 'extra': {}, 'rng': rng,
                              'rows': [{'epoch': 1}], 'run_id': run_id}), path)
    real = checkpoints.load_checkpoint

    def load_onto(p, map_location='cpu'):
        obj = real(p, 'cpu')
        if map_location != 'cpu':  # a torch.device: where the model lives, here "not the CPU"
            obj = {k: (v.to('meta') if torch.is_tensor(v) else v) for k, v in obj.items()}
        return obj
    monkeypatch.setattr(training, 'load_checkpoint', load_onto)
    torch.manual_seed(0)
    fresh = torch.nn.Linear(3, 2)
    fresh_opt = torch.optim.SGD(fresh.parameters(), lr=0.1, momentum=0.9)
    args = types.SimpleNamespace(resume=True)
    rows = training.load_resume_state(args, path, run_id, fresh, fresh_opt, {}, 't')
    assert rows == [{'epoch': 1}]
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), model.state_dict().values()))


def test_a_checkpoint_moves_everything_to_the_cpu_meta_included(monkeypatch, tmp_path):
    """A GPU run's meta holds device tensors (trigger, WaNet grid, MCL's pattern). Faked: every tensor
    that reaches the file must have been through .cpu() (which leaves a CPU tensor as it is)."""
    moved, real_cpu = set(), torch.Tensor.cpu

    def cpu(self, *a, **k):
        out = real_cpu(self, *a, **k)
        moved.add(id(out))
        return out
    monkeypatch.setattr(torch.Tensor, 'cpu', cpu)
    saved = {}
    monkeypatch.setattr(checkpoints, 'atomic_save', lambda obj, path: saved.update(obj=obj))
    pattern, grid = torch.rand(3, 4, 4), torch.rand(4, 4, 2)
    meta = {'attack': {'trigger': {'pattern': grid}}, 'mcl_pattern': pattern, 'list': [torch.ones(2)]}
    checkpoints.save_checkpoint(str(tmp_path / 'x.tar'), torch.nn.Linear(2, 2), meta, 1, {'ACC': 1.0})

    found = list(tensors_in(saved['obj']))
    assert len(found) == 5 and all(id(t) in moved for t in found)


@pytest.mark.parametrize('missing, expect', [('cc', 'a C compiler'), ('headers', "Python's C headers")])
def test_compile_auto_checks_what_inductor_needs_at_run_time(monkeypatch, tmp_path, missing, expect):
    import importlib.util
    import shutil
    import sysconfig
    monkeypatch.setattr(importlib.util, 'find_spec', lambda name: object())  # triton imports
    compilers = {'cc', 'gcc', 'clang', 'c++', 'g++', 'clang++'} - ({'cc', 'gcc', 'clang'} if missing == 'cc' else set())
    monkeypatch.setattr(shutil, 'which', lambda c: f'/usr/bin/{c}' if c in compilers else None)
    include = tmp_path / 'include'
    include.mkdir()
    if missing != 'headers':
        (include / 'Python.h').write_text('')
    monkeypatch.setattr(sysconfig, 'get_paths', lambda: {'include': str(include)})
    assert expect in device.compile_toolchain_missing(torch.device('cuda'))
    args = types.SimpleNamespace(compile='auto')
    model = torch.nn.Linear(2, 2)
    assert device.compiled(model, args, torch.device('cuda')) is model  # eager, with one line
    with pytest.raises(UserError, match='--compile off'):
        device.compiled(model, types.SimpleNamespace(compile='on'), torch.device('cuda'))
    monkeypatch.setattr(sysconfig, 'get_paths', lambda: {'include': str(tmp_path)})
    (tmp_path / 'Python.h').write_text('')
    monkeypatch.setattr(shutil, 'which', lambda c: f'/usr/bin/{c}')
    assert device.compile_toolchain_missing(torch.device('cuda')) is None
    assert device.compiled(model, args, torch.device('cuda')) is model  # auto: eager on CUDA, measured faster


def test_per_batch_draws_and_the_wanet_grid_make_no_host_copies(monkeypatch):
    """Crop, flip, Cutout and WaNet's noise grids are drawn on the data's device and the grid is copied
    there once: with the data on a GPU no batch waits for a host-to-device copy. Counted here as
    Tensor.to calls per batch (none after the grid's first copy)."""
    x = torch.randint(0, 256, (96, 32, 32, 3), dtype=torch.uint8)
    y = torch.randint(0, 4, (96,))
    attack = dict(target_type='all2one', target_label=0, inject_portion=0.2, trigger=make_trigger('wanetTrigger', 32))
    poison = batch_poisoner(attack, 4)
    batches = train_batches(x, y, 32, lambda b: b, seed=0, epoch=0, cutout=3, poison=poison)
    next(batches)  # the grid's one copy
    calls, real_to = [], torch.Tensor.to
    moves = lambda a, k: 'device' in k or any(isinstance(v, (torch.device, str)) for v in a)  # not dtype casts
    monkeypatch.setattr(torch.Tensor, 'to', lambda self, *a, **k: (moves(a, k) and calls.append(a)) or real_to(self, *a, **k))
    assert len(list(batches)) == 2 and calls == []


def test_cpu_draws_are_unchanged_by_drawing_on_the_device():
    """The device generator on the CPU is the CPU generator: the table's cells keep their batches."""
    from batching import augment
    from subsets import seeded
    x = torch.randint(0, 256, (8, 32, 32, 3), dtype=torch.uint8)
    g1, g2 = seeded(3, 's'), seeded(3, 's', 'cpu')
    assert torch.equal(augment(x, g1, cutout=3), augment(x, g2, cutout=3))


def test_retune_share_that_cannot_be_met_is_refused():
    x = torch.zeros(100, 4, 4, 3, dtype=torch.uint8)
    y = torch.arange(100) % 4
    attack = dict(target_type='all2one', target_label=0, trigger=make_trigger('gridTrigger', 4, 1, 1))
    with pytest.raises(UserError, match='--retune_ratio 0.99 asks for 99 images, but only 95'):
        retune_set(x, y, attack, 4, 0.05, 0.99, 5, seed=0)
    assert len(retune_set(x, y, attack, 4, 0.05, 0.95, 5, seed=0)[1]) == 95


def test_deterministic_sets_the_cuda_flags(monkeypatch):
    monkeypatch.delenv('CUBLAS_WORKSPACE_CONFIG', raising=False)
    try:
        device.make_deterministic()
        assert torch.are_deterministic_algorithms_enabled() and torch.backends.cudnn.deterministic
        assert not torch.backends.cudnn.benchmark and os.environ['CUBLAS_WORKSPACE_CONFIG']
    finally:
        torch.use_deterministic_algorithms(False)
        torch.backends.cudnn.deterministic = False


def _ranks(rank, world, folder, port):
    import time
    os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port))
    torch.distributed.init_process_group('gloo', rank=rank, world_size=world)

    def load():
        with open(os.path.join(folder, 'log'), 'a') as f:
            f.write(f'start {rank}\n')
        time.sleep(0.5 if rank == 0 else 0)
        with open(os.path.join(folder, 'log'), 'a') as f:
            f.write(f'end {rank}\n')
        return rank
    assert first_rank_first(load) == rank
    finite = training.all_ranks_finite(float('nan') if rank == 1 else 0.5, types.SimpleNamespace(world_size=world))
    with open(os.path.join(folder, f'finite{rank}'), 'w') as f:
        f.write(str(finite))
    torch.distributed.destroy_process_group()


def test_rank_zero_loads_first_and_one_ranks_nan_stops_every_rank(tmp_path):
    import random
    import torch.multiprocessing as mp
    mp.spawn(_ranks, args=(2, str(tmp_path), random.randint(20000, 40000)), nprocs=2, join=True)
    log = (tmp_path / 'log').read_text().split('\n')
    assert log[:2] == ['start 0', 'end 0'], log  # rank 1 waited for rank 0 (the download, the cache)
    assert (tmp_path / 'finite0').read_text() == 'False' == (tmp_path / 'finite1').read_text()


def test_batchnorm_runs_synchronised_across_gpu_ranks_only(monkeypatch):
    """Under torchrun each rank sees a slice of the global batch: on GPUs its BatchNorm layers become
    SyncBatchNorm (the statistics of the whole batch); gloo on CPUs cannot run it and keeps BatchNorm."""
    from models import select_model
    monkeypatch.setattr(torch.nn.parallel, 'DistributedDataParallel', lambda model, device_ids=None: model)
    args = types.SimpleNamespace(world_size=2)
    gpu = device.data_parallel(select_model('WRN-10-1', 4), torch.device('cuda', 0), args)
    cpu = device.data_parallel(select_model('WRN-10-1', 4), torch.device('cpu'), args)
    kinds = lambda m: {type(x) for x in m.modules() if isinstance(x, torch.nn.modules.batchnorm._BatchNorm)}
    assert kinds(gpu) == {torch.nn.SyncBatchNorm} and kinds(cpu) == {torch.nn.BatchNorm2d}
    assert list(gpu.state_dict()) == list(select_model('WRN-10-1', 4).state_dict())  # the checkpoint names stay


def test_benchmark_reports_the_sm_utilisation_nvml_gives(monkeypatch):
    """On a GPU each timed line ends with the mean SM utilisation polled while it ran (faked NVML here)."""
    import time

    import benchmark
    readings = iter([40, 60] * 1000)
    monkeypatch.setattr(torch.cuda, 'utilization', lambda device=None: next(readings))
    with benchmark.sm_sampled(torch.device('cuda'), every=0.005):
        time.sleep(0.1)
    assert 40 <= benchmark.SM['last'] <= 60 and benchmark.sm_note().startswith('   SM ')

    def no_nvml(device=None):
        raise ModuleNotFoundError('pynvml')
    monkeypatch.setattr(torch.cuda, 'utilization', no_nvml)
    with benchmark.sm_sampled(torch.device('cuda'), every=0.005):
        time.sleep(0.02)
    assert benchmark.SM['last'] is None and benchmark.sm_note() == ''
    with benchmark.sm_sampled(torch.device('cpu')):
        pass
    assert benchmark.SM['last'] is None
