import os

import pytest
import torch

from batching import Normalizer, augment, train_batches
from cli import UserError
from decoding import load_dataset
from poisoning import make_test_sets, poison_train_set
from subsets import clean_subset
from triggers import make_trigger


def toy(n=200, classes=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 200, (n, 32, 32, 3), generator=g, dtype=torch.uint8)
    return x, torch.arange(n) % classes


def attack(target_type, portion=0.1, target=2):
    return dict(target_type=target_type, target_label=target, inject_portion=portion,
                trigger=make_trigger('gridTrigger', 32))


def test_all2one_poisons_the_asked_fraction_and_relabels():
    x, y = toy()
    xp, yp, idx = poison_train_set(x, y, attack('all2one', 0.25), 4, seed=0)
    assert len(idx) == 50
    assert (yp[idx] == 2).all()
    rest = torch.ones(200, dtype=torch.bool)
    rest[idx] = False
    assert torch.equal(yp[rest], y[rest]) and torch.equal(xp[rest], x[rest])
    assert (xp[idx, 29:32, 29:32] != x[idx, 29:32, 29:32]).any()


def test_all2all_and_clean_label_rules():
    x, y = toy()
    _, yp, idx = poison_train_set(x, y, attack('all2all', 0.5), 4, seed=0)
    assert torch.equal(yp[idx], (y[idx] + 1) % 4)
    xp, yp, idx = poison_train_set(x, y, attack('cleanLabel', 0.5), 4, seed=0)
    assert len(idx) == 25 and (y[idx] == 2).all()  # half of the 50 target-class images
    assert torch.equal(yp, y)


def test_backdoor_test_set():
    x, y = toy()
    t = make_test_sets(x, y, attack('all2one'), 4)
    assert len(t['y_bd']) == 150 and (t['y_bd'] == 2).all() and (t['y_bd_true'] != 2).all()
    assert torch.equal(t['nontarget'], y != 2)
    t = make_test_sets(x, y, attack('all2all'), 4)
    assert len(t['y_bd']) == 200 and torch.equal(t['y_bd'], (y + 1) % 4)


def test_seeds_fix_subsets_and_poisoned_indices():
    x, y = toy()
    a1 = poison_train_set(x, y, attack('all2one'), 4, seed=3)[2]
    assert torch.equal(a1, poison_train_set(x, y, attack('all2one'), 4, seed=3)[2])
    assert not torch.equal(a1, poison_train_set(x, y, attack('all2one'), 4, seed=4)[2])
    s1 = clean_subset(x, y, 0.1, seed=3)[0]
    assert torch.equal(s1, clean_subset(x, y, 0.1, seed=3)[0]) and len(s1) == 20
    assert not torch.equal(s1, clean_subset(x, y, 0.1, seed=4)[0])


def test_batch_order_and_poisoning_use_independent_streams():
    # a shared stream once put every poisoned image first in epoch 0
    x, y = toy(1000)
    _, yp, idx = poison_train_set(x, y, attack('all2one', 0.1), 4, seed=0)
    first = next(train_batches(x, yp, 100, Normalizer('none', 'cpu'), 0, 0))[1]
    assert (first == 2).float().mean() < 0.6


def test_augment_is_a_shifted_window_or_its_mirror():
    x, _ = toy(64)
    out = augment(x, torch.Generator().manual_seed(0))
    padded = torch.nn.functional.pad(x.permute(0, 3, 1, 2), (4, 4, 4, 4)).permute(0, 2, 3, 1)
    flips = 0
    for i in range(64):
        windows = [padded[i, r:r + 32, c:c + 32] for r in range(9) for c in range(9)]
        plain = any(torch.equal(out[i], w) for w in windows)
        mirrored = any(torch.equal(out[i].flip(1), w) for w in windows)
        assert plain or mirrored
        flips += mirrored and not plain
    assert 15 < flips < 49


def test_batches_are_normalised_on_the_device():
    x, y = toy(512)
    norm = Normalizer('0.5,0.5,0.5,0.25,0.25,0.25', 'cpu')
    xb, yb = next(train_batches(x, y, 512, norm, 0, 0, augment_data=False))
    assert xb.shape == (512, 3, 32, 32) and xb.dtype == torch.float32
    raw = x.float().div(255)
    assert abs(xb.mean().item() - (raw.mean().item() - 0.5) / 0.25) < 1e-4
    assert xb.is_contiguous(memory_format=torch.channels_last)
    assert sorted(yb.tolist()) == sorted(y.tolist())
    batches = list(train_batches(x, y, 100, norm, 0, 1))
    assert [len(b[1]) for b in batches] == [100] * 5 + [12]
    assert [len(b[1]) for b in train_batches(x, y, 100, norm, 0, 1, drop_last=True)] == [100] * 5


def test_image_folder_is_read_once_and_cached(image_folder):
    d = load_dataset('ImageFolder', image_folder)
    assert d['classes'] == ['amber', 'blue', 'green', 'red']
    assert d['x_train'].shape == (400, 32, 32, 3) and d['x_test'].shape == (200, 32, 32, 3)
    assert d['x_train'].dtype == torch.uint8 and d['y_train'].bincount().tolist() == [100] * 4
    assert os.path.exists(os.path.join(image_folder, '.decoded_folder32.pt'))
    again = load_dataset('ImageFolder', image_folder)
    assert torch.equal(again['x_test'], d['x_test'])
    with pytest.raises(UserError, match='4 class folders, CIFAR10 has 10'):
        load_dataset('CIFAR10', image_folder)


def test_folder_without_splits_is_rejected(tmp_path):
    with pytest.raises(UserError, match='train/<class>'):
        load_dataset('ImageFolder', str(tmp_path))


def test_cutout_blacks_out_the_references_clipped_hole():
    """Cutout(1, 3) of NAD/ARGD: rows and columns [c - 1, c + 1) around a random centre, clipped to the
    image: a 2x2 hole, smaller only where the centre is on the top or left edge."""
    x = torch.full((400, 32, 32, 3), 200, dtype=torch.uint8)
    g = lambda: torch.Generator().manual_seed(3)
    plain, cut = augment(x, g(), pad=0), augment(x, g(), pad=0, cutout=3)  # pad 0: the crop is the image
    assert torch.equal(plain, x)
    holes = (cut == 0).all(-1)
    assert torch.equal(holes, (cut != 200).any(-1))  # all channels black, nothing else touched
    sizes = holes.flatten(1).sum(1)
    assert set(sizes.tolist()) <= {1, 2, 4} and (sizes == 4).float().mean() > 0.9
    for i in range(len(x)):
        r, c = holes[i].nonzero().T
        assert r.max() - r.min() == (1 if sizes[i] == 4 or (sizes[i] == 2 and c.min() == c.max()) else 0)
        assert holes[i, r.min():r.max() + 1, c.min():c.max() + 1].all()  # a filled rectangle


@pytest.mark.parametrize('trigger_type, target_type', [('gridTrigger', 'all2one'), ('blendedTrigger', 'all2all'),
                                                       ('signalTrigger', 'cleanLabel')])
def test_dataset_bd_is_pixel_identical_to_what_the_scripts_train_and_score_on(image_folder, trigger_type, target_type):
    """The references' DatasetBD over a torchvision-style set of PIL images: mode='train' is train_badnet.py's
    poisoned set, mode='test' with inject_portion 1 the backdoor test set ASR is scored on (RunData's), 0 the
    references' clean test set (no target class); DatasetCL is the defenders' clean subset; a plain DataLoader
    batches them."""
    from types import SimpleNamespace

    from PIL import Image
    from torch.utils.data import DataLoader

    from cli import parse_args
    from data_loader import DatasetBD, DatasetCL, RunData
    data = load_dataset('ImageFolder', image_folder, verbose=False)
    pil = lambda split: [(Image.fromarray(img.numpy()), int(label))
                         for img, label in zip(data[f'x_{split}'], data[f'y_{split}'])]
    opt = SimpleNamespace(target_label=1, trig_w=3, trig_h=3, trigger_type=trigger_type, target_type=target_type,
                          seed=3, num_class=4, ratio=0.1)
    args = parse_args('train_badnet.py', ['--dataset', 'ImageFolder', '--data_root', image_folder, '--seed', 3,
                                          '--trigger_type', trigger_type, '--target_type', target_type,
                                          '--target_label', 1, '--inject_portion', 0.3])
    run = RunData(args, torch.device('cpu'), verbose=False)

    train = DatasetBD(opt, pil('train'), 0.3, mode='train')
    x, y, idx = poison_train_set(data['x_train'], data['y_train'], run.attack, 4, 3)
    assert torch.equal(train.x, x) and torch.equal(train.y, y) and torch.equal(train.poisoned, idx) and len(idx) > 0

    bad = DatasetBD(opt, pil('test'), 1, mode='test')
    assert torch.equal(bad.x, run.test['x_bd']) and torch.equal(bad.y, run.test['y_bd'])
    assert (bad.y == (run.test['y_bd_true'] + 1) % 4).all() if target_type == 'all2all' else (bad.y == 1).all()
    clean = DatasetBD(opt, pil('test'), 0, mode='test')
    keep = run.test['nontarget']
    assert torch.equal(clean.x, data['x_test'][keep]) and torch.equal(clean.y, data['y_test'][keep])
    assert target_type == 'all2all' or not (clean.y == 1).any()

    cl = DatasetCL(opt, pil('train'))
    assert torch.equal(cl.x, clean_subset(data['x_train'], data['y_train'], 0.1, 3)[0]) and len(cl) == 40

    xb, yb = next(iter(DataLoader(bad, batch_size=16)))
    assert xb.shape == (16, 32, 32, 3) and xb.dtype == torch.uint8 and torch.equal(yb, bad.y[:16])
    to_tensor = lambda a: torch.from_numpy(a).permute(2, 0, 1).float() / 255  # what ToTensor gives
    xt, _ = next(iter(DataLoader(DatasetBD(opt, pil('test'), 1, to_tensor, mode='test'), batch_size=8)))
    assert torch.equal(xt, bad.x[:8].permute(0, 3, 1, 2).float() / 255)


def test_dataset_bd_rejects_what_it_cannot_do(image_folder):
    from types import SimpleNamespace

    from data_loader import DatasetBD
    data = load_dataset('ImageFolder', image_folder, verbose=False)
    items = list(zip(data['x_test'].numpy(), data['y_test'].tolist()))  # HWC arrays serve as well as PIL images
    opt = SimpleNamespace(target_label=0, trig_w=3, trig_h=3, trigger_type='gridTrigger', target_type='all2one')
    with pytest.raises(ValueError, match='mode'):
        DatasetBD(opt, items, 1, mode='val')
    with pytest.raises(ValueError, match='distance'):
        DatasetBD(opt, items, 1, mode='test', distance=2)
    assert len(DatasetBD(opt, items, 1, mode='test')) == int((data['y_test'] != 0).sum())


def test_the_references_loaders_take_a_scripts_options(image_folder):
    """get_train_loader / get_test_loader / get_backdoor_loader with the options a script parses (opt)."""
    from cli import parse_args
    from data_loader import get_backdoor_loader, get_test_loader, get_train_loader
    opt = parse_args('main-ARGD.py', ['--dataset', 'ImageFolder', '--data_root', image_folder, '--ratio', 0.1,
                                      '--trigger_type', 'squareTrigger', '--inject_portion', 0.25])
    xb, yb = next(iter(get_train_loader(opt)))
    assert xb.shape == (40, 3, 32, 32) and 0 <= float(xb.min()) and float(xb.max()) <= 1  # 0.1 of 400, one batch
    clean, bad = get_test_loader(opt)
    assert len(clean.dataset) == len(bad.dataset) == 150 and (bad.dataset.y == 0).all()
    x, _ = next(iter(bad))
    assert (x[:, :, 28:31, 28:31] == 1).all()  # the 3x3 white square, one pixel from the corner
    assert len(get_backdoor_loader(opt).dataset.poisoned) == 100  # 0.25 of 400
