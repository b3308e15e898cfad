"""GTSRB on a small synthetic 43-class folder: class order, MCL's trojan rule against the reference's
arithmetic, and what config.DATASETS changes (normalisation, no crop/flip, the zoo folder)."""
import os
import types

import numpy as np
import pytest
import torch
from PIL import Image

import config
from batching import train_batches
from cli import UserError
from data_loader import RunData
from decoding import load_dataset
from triggers import apply_trigger, make_trigger


def gtsrb_folder(root, classes=43):
    """Class folders 00..42 as the shared copy has them; every image of class c has the value c*5 + split."""
    for split, n in (('train', 3), ('test', 2)):
        for c in range(classes):
            d = root / split / f'{c:02d}'
            d.mkdir(parents=True)
            for i in range(n):
                Image.fromarray(np.full((32, 32, 3), c * 5 + (split == 'test'), np.uint8)).save(d / f'{i:05d}.png')
    return root


@pytest.fixture(scope='module')
def gtsrb(tmp_path_factory):
    return gtsrb_folder(tmp_path_factory.mktemp('gtsrb'))


def test_the_folders_are_the_class_ids_in_order(gtsrb):
    data = load_dataset('GTSRB', str(gtsrb), verbose=False)
    assert data['classes'] == [f'{c:02d}' for c in range(43)]
    assert data['y_train'].tolist() == [c for c in range(43) for _ in range(3)]
    assert (data['x_train'][:, 0, 0, 0] == data['y_train'] * 5).all()  # image i is of its folder's class
    assert (data['x_test'][:, 0, 0, 0] == data['y_test'] * 5 + 1).all()


def test_a_folder_with_another_class_count_is_refused(tmp_path):
    with pytest.raises(UserError, match='has 42 class folders, GTSRB has 43'):
        load_dataset('GTSRB', str(gtsrb_folder(tmp_path, classes=42)), verbose=False)


def reference_trojan(img_rgb, pattern_png):
    """MCL's arithmetic: the image read by OpenCV (BGR), the pattern by PIL (RGB) as a uint8 array,
    image elements where the pattern is non-zero set to 0, then the pattern added (uint8)."""
    img = np.ascontiguousarray(img_rgb[..., ::-1])  # what cv2.imread gives
    ptn = np.array(Image.open(pattern_png).convert('RGB'))
    img[np.nonzero(ptn)] = 0
    out_bgr = img + ptn
    return out_bgr[..., ::-1]  # back to RGB, the layout here


def test_the_gtsrb_trojan_is_pixel_for_pixel_the_references(tmp_path):
    rng = np.random.default_rng(0)
    ptn = np.zeros((32, 32, 3), np.uint8)
    ptn[25:28, 25:28] = rng.integers(1, 256, (3, 3, 3))
    ptn[25, 25, 1] = 0  # a zero channel value inside the patch keeps the image's value there
    ptn[2, 3, 0] = 77   # and a lone value elsewhere
    path = tmp_path / 'trigger_gtsrb.png'
    Image.fromarray(ptn).save(path)
    x = rng.integers(0, 256, (6, 32, 32, 3), dtype=np.uint8)
    trigger = make_trigger('trojanTrigger', 32, trigger_path=str(path))
    got = apply_trigger(trigger, torch.from_numpy(x)).numpy()
    expect = np.stack([reference_trojan(img, path) for img in x])
    assert np.array_equal(got, expect)
    assert trigger['rule'] == 'stamp' and not np.array_equal(got[:, 25, 25], x[:, 25, 25])


def test_the_shared_gtsrb_pattern_if_it_is_here():
    path = os.path.join(os.path.dirname(__file__), '..', '..', 'shared', 'data', 'trigger_gtsrb.png')
    if not os.path.exists(path):
        pytest.skip('the shared trigger file is not here')
    trigger = make_trigger('trojanTrigger', 32, trigger_path=path)
    rows, cols = torch.nonzero(trigger['mask'].any(-1), as_tuple=True)
    assert (rows.min(), rows.max(), cols.min(), cols.max()) == (25, 27, 25, 27)  # its 3x3 patch


def test_per_data_set_config_normalisation_no_crop_flip_and_meta(gtsrb):
    args = types.SimpleNamespace(dataset='CIFAR10', data_root=str(gtsrb), image_size=None, num_class=None,
                                 normalize=None, seed=0, given=set(), **config.ATTACK)
    data = RunData(args, torch.device('cpu'), meta={'dataset': 'GTSRB'}, verbose=False)  # the model's meta decides
    assert args.dataset == 'GTSRB' and data.num_classes == 43 and not data.crop_flip
    assert data.normalizer.values == [0.3403, 0.3121, 0.3214, 0.2724, 0.2608, 0.2669]
    x, y = data.x_train, data.y_train
    batches = list(train_batches(x, y, 32, lambda b: b, seed=0, epoch=0, crop_flip=data.crop_flip))
    seen = torch.cat([b for b, _ in batches])
    order = torch.cat([yb for _, yb in batches])
    assert sorted(order.tolist()) == y.tolist()  # every image once, shuffled
    # no crop (its zero padding would darken a border) and no flip: each image exactly as stored
    assert all(torch.equal(img, x[(y == label).nonzero()[0, 0]]) for img, label in zip(seen, order))
    assert config.DATASETS['GTSRB']['zoo'] == 'zoo/gtsrb'


def test_a_gtsrb_table_reads_its_own_zoo_and_tells_mcl_the_rows_target(tmp_path):
    import table
    from cli import parse_args
    zoo = tmp_path / 'zoo' / 'gtsrb'
    zoo.mkdir(parents=True)
    (zoo / 'sig-cl.tar').write_bytes(b'x')
    (tmp_path / 'zoo' / 'sig-cl.tar').write_bytes(b'y')  # CIFAR-10's, not this table's
    args = parse_args('run_table.py', ['--dataset', 'GTSRB', '--data_root', str(tmp_path), '--checkpoint_root', str(tmp_path)])
    assert table.zoo_model(args, 'sig-cl') == str(zoo / 'sig-cl.tar')
    assert table.row_target(args, 'sig-cl') == 2 and table.row_target(args, 'badnet') == 0
    cifar = parse_args('run_table.py', ['--data_root', str(tmp_path), '--checkpoint_root', str(tmp_path)])
    assert table.zoo_model(cifar, 'sig-cl') == str(tmp_path / 'zoo' / 'sig-cl.tar')
    assert table.row_target(cifar, 'sig-cl') == 0
