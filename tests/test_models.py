import pytest
import torch

from models import MODELS, select_model


@pytest.mark.parametrize('name', list(MODELS))
def test_shapes(name):
    model = select_model(name, 7).eval()
    x = torch.randn(2, 3, 32, 32)
    logits, feats, pooled = model(x, features=True)
    assert logits.shape == (2, 7) and torch.equal(logits, model(x))
    assert len(feats) == 3 and pooled.shape == (2, model.feature_dim)
    sizes = [f.shape[-1] for f in feats]
    assert sizes == sorted(sizes, reverse=True) and sizes[-1] >= 4


def test_wrn_parameter_names_match_published_checkpoints():
    keys = set(select_model('WRN-16-1', 10).state_dict())
    for k in ('conv1.weight', 'block1.layer.0.bn1.weight', 'block1.layer.0.conv1.weight', 'block1.layer.1.conv2.weight',
              'block2.layer.0.convShortcut.weight', 'block3.layer.1.bn2.running_var', 'bn1.weight', 'fc.weight',
              'fc.bias'):
        assert k in keys, k
    assert 'block1.layer.0.convShortcut.weight' not in keys  # 16 -> 16 channels: identity shortcut
    feats = select_model('WRN-16-1', 10)(torch.randn(1, 3, 32, 32), features=True)[1]
    assert [tuple(f.shape[1:]) for f in feats] == [(16, 32, 32), (32, 16, 16), (64, 8, 8)]


def test_unknown_model():
    with pytest.raises(ValueError, match='unknown model'):
        select_model('VGG', 10)


def test_compile_auto_falls_back_without_a_toolchain_and_on_refuses(monkeypatch, capsys):
    import device
    from cli import UserError
    from types import SimpleNamespace
    model = select_model('WRN-10-1', 10)
    monkeypatch.setattr(device.shutil, 'which', lambda name: None)  # no C++ compiler on PATH
    assert device.compiled(model, SimpleNamespace(compile='auto'), torch.device('cpu')) is model
    assert 'torch.compile off (a C++ compiler not found)' in capsys.readouterr().out
    with pytest.raises(UserError, match=r'--compile on needs a C\+\+ compiler; use --compile off'):
        device.compiled(model, SimpleNamespace(compile='on'), torch.device('cpu'))
    assert device.compiled(model, SimpleNamespace(compile='off'), torch.device('cpu')) is model
