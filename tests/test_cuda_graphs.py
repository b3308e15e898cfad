"""--cuda_graphs on, checked on the CPU: the router (which call goes to which graph, which runs eagerly)
with stand-ins for the two CUDA captures that keep their semantics (warm-up calls that move BatchNorm's
statistics; a forward graph's outputs overwritten in place at each replay). The real captures run in
test_cuda.py, on a GPU."""
import copy
import os
import runpy
import sys
import types

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call
from torch.utils._pytree import tree_flatten

import config
import cuda_graphs
import device
from conftest import ROOT, run_script, summary
from errors import UserError
from metrics import predict
from models import select_model
from training import train_epoch

CPU = torch.device('cpu')
ON = types.SimpleNamespace(cuda_graphs='on', amp=False, world_size=1)


def fake_autograd(captured):
    """make_graphed_callables' stand-in: its warm-up (forward and backward on the sample), then the call."""
    def capture(call, sample):
        captured.append('autograd')
        for _ in range(cuda_graphs.WARMUP):
            out = [t for t in tree_flatten(call(sample))[0] if t.requires_grad]
            inputs = [t for t in (sample, *call.parameters()) if t.requires_grad]
            torch.autograd.grad(out, inputs, [torch.ones_like(o) for o in out], allow_unused=True)
        return call
    return capture


def fake_forward(captured):
    """A forward graph's stand-in: static input, warm-up, and outputs written in place at each replay."""
    def capture(call, sample):
        captured.append('forward')
        static = sample.clone()
        for _ in range(cuda_graphs.WARMUP):
            call(static)
        out = call(static)

        def run(x):
            static.copy_(x)
            for kept, new in zip(tree_flatten(out)[0], tree_flatten(call(static))[0]):
                kept.copy_(new)
            return out
        return run
    return capture


def graphed_model(seed=0, arch='WRN-10-1'):
    torch.manual_seed(seed)
    model = device.prepare_model(select_model(arch, 4), CPU)
    plain = copy.deepcopy(model)
    captured = []
    cuda_graphs.install(model, CPU, ON, fake_autograd(captured), fake_forward(captured))
    return model, plain, captured


def train_both(model, plain, batches, epochs):
    """The same epochs through train_epoch for both models: a features call and a plain call per step (as
    ARGD's student and a second term), SGD Nesterov with weight decay (also test_cuda.py's, on a GPU)."""
    def loss_of(m):
        def loss(x, y):
            logits, maps, _ = m(x, features=True)
            return F.cross_entropy(logits, y) + 0.1 * maps[2].pow(2).mean() + 0.01 * m(x).pow(2).mean()
        return loss
    for m in (model, plain):
        opt = torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4, nesterov=True)
        for _ in range(epochs):
            train_epoch(m, opt, loss_of(m), batches, 0.05, False)


def images(n, seed=1):
    return torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed)).contiguous(
        memory_format=torch.channels_last)


def test_each_kind_of_call_is_captured_once_then_replayed():
    model, _, captured = graphed_model()
    router = model.forward
    x = images(8)
    for _ in range(2):
        model(x).sum().backward()
    assert captured == ['autograd'] and router.eager_calls == 0
    logits, maps, pooled = model(x, features=True)  # another kind: the features call
    (logits.sum() + maps[2].sum()).backward()
    model(x[:5]).sum().backward()  # a ragged batch
    with torch.no_grad():
        model.eval()
        model(x)
        model(x)
    assert captured == ['autograd', 'autograd', 'autograd', 'forward'] and router.eager_calls == 0
    assert len(router.graphs) == 4


def test_a_call_runs_eagerly_while_the_last_ones_backward_may_still_run():
    model, _, _ = graphed_model()
    router, x = model.forward, images(8)
    a, b = model(x), model(x)  # the graph's activations still wait for a's backward: b runs eagerly
    assert router.eager_calls == 1
    (a.sum() + b.sum()).backward()
    c = model(x)  # a's backward ran (and freed its graph): replayed
    assert router.eager_calls == 1
    c.sum().backward(retain_graph=True)  # c's backward may run again
    model(x)
    assert router.eager_calls == 2
    del c  # the caller let c and its autograd graph go
    d = model(x)
    assert router.eager_calls == 2
    torch.autograd.grad(d.sum(), model.fc.weight)  # torch.autograd.grad frees the graph too
    model(x)
    assert router.eager_calls == 2


def test_an_implicit_hypergradient_through_the_router_equals_eager():
    """I-BAU's pattern: a retained gradient of one call, then a create_graph gradient of a second call of the
    same kind (which graphed would refuse: its backward is not differentiable), then the first's backward again."""
    from defenses.i_bau import implicit_surrogate
    model, plain, _ = graphed_model()
    x = images(8)
    grads = []
    for m in (model, plain):
        delta = torch.zeros(1, 3, 32, 32, requires_grad=True)
        value = implicit_surrogate(lambda d: m(x + d).pow(2).mean(), lambda d: m(x + d).pow(2).mean() -
                                   d.pow(2).sum(), delta, 0.1, 3)
        value.backward()
        grads.append([p.grad.clone() for p in m.parameters()])
    assert model.forward.eager_calls == 1  # the inner call: the outer one's graph is retained
    assert all(torch.equal(a, b) for a, b in zip(*grads))


def test_what_runs_eagerly(monkeypatch):
    model, _, captured = graphed_model()
    router, x = model.forward, images(8)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        model(x)
    assert router.eager_calls == 1
    handle = model.block1.register_forward_hook(lambda *a: None)  # a hook's Python would run only at capture
    model(x)
    handle.remove()
    assert router.eager_calls == 2
    weights = {k: v.detach() * 1.0 for k, v in model.named_parameters()}  # MCR's curve: weights from outside
    functional_call(model, weights, (x,))
    assert router.eager_calls == 3 and captured == []
    monkeypatch.setitem(config.CUDA_GRAPHS, 'max_graphs', 2)
    for n in (8, 7, 6):  # the third kind finds the graphs full
        model(x[:n]).sum().backward()
    assert len(router.graphs) == 2 and router.eager_calls == 4


def test_a_weight_that_moves_is_another_kind():
    model, _, captured = graphed_model()
    x = images(8)
    model(x).sum().backward()
    model.fc.weight.data = model.fc.weight.data.clone()  # a new address: the old graph would read stale memory
    model(x).sum().backward()
    model.fc.requires_grad_(False)  # frozen: the old graph would still return its gradient
    model(x).sum().backward()
    assert captured == ['autograd'] * 3


def test_training_through_the_router_equals_eager_bit_for_bit():
    """Steps through train_epoch (features and a ragged last batch), then evaluation batches: same weights,
    same BatchNorm statistics (the captures' warm-up moves are undone), same predictions."""
    model, plain, captured = graphed_model()
    g = torch.Generator().manual_seed(2)
    batches = [(images(8, seed=s), torch.randint(0, 4, (8,), generator=g)) for s in range(4)]
    batches.append((images(5, seed=9), torch.randint(0, 4, (5,), generator=g)))

    train_both(model, plain, batches, epochs=2)
    assert captured.count('autograd') == 4  # features and plain calls, at 8 and at the ragged 5
    for (k, a), b in zip(model.state_dict().items(), plain.state_dict().values()):
        assert torch.equal(a, b), k
    x = torch.randint(0, 256, (23, 32, 32, 3), dtype=torch.uint8)
    norm = lambda u: u.permute(0, 3, 1, 2).float().div(255)
    model.eval(), plain.eval()
    assert torch.equal(predict(model, x, norm, 10), predict(plain, x, norm, 10))
    assert 'forward' in captured


def test_outputs_kept_by_the_caller_survive_the_next_replay():
    model, plain, _ = graphed_model()
    model.eval(), plain.eval()
    x1, x2 = images(8, seed=3), images(8, seed=4)
    with torch.no_grad():
        kept = model(x1, features=True)
        model(x2, features=True)  # replays the graph over its static outputs
        expect = plain(x1, features=True)
    for a, b in zip(tree_flatten(kept)[0], tree_flatten(expect)[0]):
        assert torch.equal(a, b)


def test_a_copy_of_the_model_gets_its_own_graphs():
    model, _, _ = graphed_model()
    twin = copy.deepcopy(model)  # SAU's frozen reference, FT's teacher
    assert twin.forward.model is twin and twin.forward.graphs == {}
    with torch.no_grad():
        twin.fc.bias += 1.0
        model.eval(), twin.eval()
        x = images(4)
        assert torch.allclose(twin(x), model(x) + 1.0, atol=1e-5)


def test_on_the_cpu_the_flag_falls_back_to_eager(capsys, monkeypatch):
    monkeypatch.setattr(cuda_graphs, 'SAID', set())
    model = select_model('WRN-10-1', 4)
    assert cuda_graphs.install(model, CPU, ON) is model and not cuda_graphs.installed(model)
    assert 'CUDA graphs off (cpu has none' in capsys.readouterr().out


def test_graphs_refuse_torch_compile_and_torchrun():
    model, _, _ = graphed_model()
    with pytest.raises(UserError, match='does not compose with torch.compile'):
        device.compiled(model, types.SimpleNamespace(compile='on'), CPU)
    with pytest.raises(UserError, match='torchrun'):
        cuda_graphs.install(select_model('WRN-10-1', 4), torch.device('cuda'),
                            types.SimpleNamespace(cuda_graphs='on', amp=False, world_size=2))


def test_a_script_with_cuda_graphs_on_runs_on_the_cpu_as_without(backdoored, image_folder):
    common = ['--dataset', 'ImageFolder', '--data_root', image_folder, '--model', backdoored['path'], '--device', 'cpu']
    on, off = run_script('evaluate.py', *common, '--cuda_graphs', 'on'), run_script('evaluate.py', *common)
    assert on.returncode == 0 and off.returncode == 0, on.stderr + off.stderr
    assert on.stdout.count('CUDA graphs off (cpu has none') == 1
    assert summary(on.stdout) == summary(off.stdout)


@pytest.mark.slow
@pytest.mark.parametrize('script, flags', [
    ('main-ARGD.py', ['--epochs', 2, '--teacher_epochs', 1]),  # the teacher's no-grad calls, features steps
    ('main-ARGD.py', ['--defense', 'nad', '--epochs', 1, '--teacher_epochs', 1, '--source', 'inverted']),
    ('main_mcl.py', ['--epochs', 1, '--mcl_target', 0, '--inv_epochs', 2, '--keep_target']),  # inversion
    ('main_ft.py', ['--defense', 'ft-at', '--epochs', 1]),  # PGD: input gradients
    ('main_ft.py', ['--defense', 'sau', '--epochs', 1]),    # a deep-copied reference, eval-mode steps
    ('main_ft.py', ['--defense', 'i-bau', '--epochs', 1]),  # the implicit hypergradient
    ('main_ft.py', ['--defense', 'pam', '--epochs', 1]),    # weights moved in place around each step
    ('main_ft.py', ['--defense', 'mcr', '--epochs', 2, '--teacher_epochs', 1]),  # functional_call
])
def test_each_defense_through_the_router_equals_eager(backdoored, image_folder, tmp_path, script, flags):
    """The defenses' own call patterns through the router (the stand-in captures, in this process): the
    defended weights equal the eager run's bit for bit, and the router was on the path."""
    real_install, captured, weights = cuda_graphs.install, [], {}

    def with_stand_ins(model, dev, args, *rest):
        return real_install(model, dev, args, fake_autograd(captured), fake_forward(captured))
    for graphs in ('on', 'off'):
        out = tmp_path / f'{graphs}.tar'
        argv = [script, '--dataset', 'ImageFolder', '--data_root', image_folder, '--device', 'cpu', '--precision',
                'fp32', '--s_model', backdoored['path'], '--ratio', 0.5, '--batch_size', 32, '--output', out,
                '--checkpoint_root', tmp_path / graphs, '--log_root', tmp_path / graphs, '--cuda_graphs', graphs, *flags]
        with pytest.MonkeyPatch.context() as m:
            m.setattr(cuda_graphs, 'install', with_stand_ins)
            m.setattr(sys, 'argv', [str(a) for a in argv])
            runpy.run_path(os.path.join(ROOT, script), run_name='__main__')
        weights[graphs] = torch.load(out, weights_only=True)['state_dict']
    assert 'autograd' in captured and 'forward' in captured
    for k, v in weights['on'].items():
        assert torch.equal(v, weights['off'][k]), k
