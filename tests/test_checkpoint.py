import os
import pickle

import pytest
import torch

import checkpoints
import files
from cli import UserError, parse_args
from models import select_model


def args(*argv):
    return parse_args('evaluate.py', list(argv))


def saved(tmp_path, arch='WRN-10-1', meta=None):
    torch.manual_seed(0)
    model = select_model(arch, 4)
    path = str(tmp_path / 'm.tar')
    checkpoints.save_checkpoint(path, model, meta or {'arch': arch, 'num_classes': 4, 'normalize': [0] * 3 + [1] * 3}, 3,
                          {'ACC': 90.0, 'ASR': 99.0})
    return model, path


def test_round_trip_is_identical(tmp_path):
    model, path = saved(tmp_path)
    loaded, meta = checkpoints.load_model(path, args(), None, torch.device('cpu'))
    assert meta['arch'] == 'WRN-10-1' and meta['num_classes'] == 4
    for k, v in model.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k]), k
    x = torch.randn(3, 3, 32, 32)
    model = model.to(memory_format=torch.channels_last)  # load_model returns the channels_last layout
    assert torch.equal(model.eval()(x), loaded.eval()(x))
    ckpt = torch.load(path, weights_only=True)
    assert ckpt['epoch'] == 3 and ckpt['best_clean_acc'] == 90.0 and ckpt['best_bad_acc'] == 99.0
    assert [f for f in os.listdir(tmp_path) if f.endswith('.tmp')] == []


def test_checkpoint_saved_on_cuda_loads_on_cpu(tmp_path, monkeypatch):
    model = select_model('WRN-10-1', 4)
    path = str(tmp_path / 'cuda.tar')
    monkeypatch.setattr(torch.serialization, 'location_tag', lambda storage: 'cuda:0')
    torch.save({'state_dict': model.state_dict(), 'epoch': 1}, path)
    monkeypatch.undo()
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError):
            torch.load(path, weights_only=True)  # what a naive load does on a CPU-only machine
    loaded, _ = checkpoints.load_model(path, args('--arch', 'WRN-10-1'), 4, torch.device('cpu'))
    assert torch.equal(loaded.state_dict()['fc.weight'], model.state_dict()['fc.weight'])


def test_meta_is_written(tmp_path):
    from batching import Normalizer
    from triggers import make_trigger
    a = args('--dataset', 'CIFAR10')
    attack = dict(trigger_type='wanetTrigger', target_type='all2one', target_label=3, inject_portion=0.1, trig_w=3,
                  trig_h=3, trigger=make_trigger('wanetTrigger', 32, seed=0))
    meta = checkpoints.make_meta(a, 'WRN-10-1', 4, 32, Normalizer('cifar', 'cpu'), attack, 'test')
    _, path = saved(tmp_path, meta=meta)
    m = torch.load(path, weights_only=True)['meta']
    assert m['arch'] == 'WRN-10-1' and m['dataset'] == 'CIFAR10' and m['image_size'] == 32
    assert m['attack']['target_label'] == 3 and m['attack']['trigger']['pattern'].shape == (32, 32, 2)
    assert m['normalize'][:3] == pytest.approx([0.4914, 0.4822, 0.4465])


def test_malicious_pickle_never_runs(tmp_path):
    marker = tmp_path / 'pwned'

    class Evil:
        def __reduce__(self):
            return (os.system, (f'touch {marker}',))
    torch.save({'state_dict': Evil()}, tmp_path / 'evil.tar')
    with pytest.raises(UserError, match='could run code'):
        checkpoints.load_checkpoint(str(tmp_path / 'evil.tar'))
    with open(tmp_path / 'evil.pkl', 'wb') as f:  # a bare pickle is refused too
        pickle.dump({'state_dict': Evil()}, f)
    with pytest.raises(UserError, match='could run code|not a readable'):
        checkpoints.load_checkpoint(str(tmp_path / 'evil.pkl'))
    assert not marker.exists()


@pytest.mark.parametrize('content', [b'', b'not a checkpoint at all', 'truncated'])
def test_broken_files_give_clear_errors(tmp_path, content):
    if content == 'truncated':
        _, good = saved(tmp_path)
        content = open(good, 'rb').read()[:5000]
    path = tmp_path / 'bad.tar'
    path.write_bytes(content)
    with pytest.raises(UserError, match='empty|not a readable'):
        checkpoints.load_checkpoint(str(path))


def test_missing_directory_and_wrong_architecture(tmp_path):
    with pytest.raises(UserError, match='not found'):
        checkpoints.load_checkpoint(str(tmp_path / 'nope.tar'))
    with pytest.raises(UserError, match='directory'):
        checkpoints.load_checkpoint(str(tmp_path))
    _, path = saved(tmp_path)
    with pytest.raises(UserError, match=r'does not fit WRN-16-1.*(missing|unexpected)'):
        checkpoints.load_model(path, args('--arch', 'WRN-16-1'), 4, torch.device('cpu'))
    with pytest.raises(UserError, match=r'shape mismatch 2: fc.weight \(4, 64\) vs \(10, 64\)'):
        checkpoints.load_model(path, args('--num_class', '10'), None, torch.device('cpu'))


def test_nan_weights_are_refused(tmp_path):
    model = select_model('WRN-10-1', 4)
    with torch.no_grad():
        model.fc.weight[0, 0] = float('nan')
    path = str(tmp_path / 'nan.tar')
    checkpoints.save_checkpoint(path, model, {'arch': 'WRN-10-1', 'num_classes': 4}, 1, {})
    with pytest.raises(UserError, match='NaN'):
        checkpoints.load_model(path, args(), 4, torch.device('cpu'))


def test_a_failed_write_keeps_the_previous_file(tmp_path, monkeypatch):
    path = str(tmp_path / 'keep.bin')
    files.atomic_write_bytes(b'old', path)

    def broken_fsync(fd):
        raise OSError('disk full')
    monkeypatch.setattr(os, 'fsync', broken_fsync)
    with pytest.raises(OSError):
        files.atomic_write_bytes(b'new and partial', path)
    assert open(path, 'rb').read() == b'old'
    assert os.listdir(tmp_path) == ['keep.bin']
