"""BTI-DBF's pieces on small inputs: the U-Net's shapes, the models' feature split, the generator held to its image
bound by the pull-back, the benign mask's objective, and the detection's vote."""
import shutil
import types

import pytest
import torch
import torch.nn.functional as F

from conftest import run_script, toy_flags
from defenses.btidbf import Generator, benign_mask, detect, invert
from models import select_model
from models.unet import UNet
from subsets import seeded

CPU = torch.device('cpu')


def args(**kw):
    base = dict(seed=0, amp=False, bti_mask_epochs=3, bti_mask_lr=0.01, bti_gen_epochs=6, bti_norm_bound=0.05,
                bti_feat_bound=1e9)
    return types.SimpleNamespace(**dict(base, **kw))


def images(n=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, 4, (n,), generator=g)


def test_unet_maps_images_to_images_and_the_models_split_at_their_pooled_map():
    x, _ = images(2)
    assert UNet()(x).shape == x.shape
    for arch in ('WRN-10-1', 'ResNet18'):
        model = select_model(arch, 4).eval()
        with torch.no_grad():
            f = model.to_features(x)
            assert f.dim() == 4 and f.shape[1] == model.feature_dim
            assert torch.allclose(model.from_features(f), model(x), atol=1e-5)


def test_the_pull_back_holds_the_generator_near_its_image_bound():
    """Without the bound the generator's objective (move the non-benign features) keeps the (untrained) U-Net's
    images far from the inputs; with it, each batch past the bound only pulls back, so 20 steps bring the image
    MSE down towards the bound (0.12 measured), far below the free run's (1.23)."""
    x, y = images(8)
    batches = lambda name: [(x, y)]
    model = select_model('WRN-10-1', 4).eval().requires_grad_(False)
    mask = torch.full_like(model.to_features(x[:1]), 0.5)
    mse, lines = {}, {}
    for bound in (0.05, float('inf')):
        torch.manual_seed(0)
        gen = Generator()
        opt = torch.optim.Adam(gen.parameters(), lr=1e-3)
        lines[bound] = []
        invert(gen, opt, model, mask, batches, args(bti_norm_bound=bound, bti_gen_epochs=20), CPU, 0, lines[bound].append)
        with torch.no_grad():
            mse[bound] = F.mse_loss(gen(x), x).item()
    assert mse[0.05] < 0.25 and mse[float('inf')] > 4 * mse[0.05], mse
    # each pass's line says which bound pulled its batch back (one batch a pass here)
    pulled = lambda line: line.split('pulled back by the image bound ')[1].split(',')[0]
    assert len(lines[0.05]) == 20 and all(pulled(line) == '0' for line in lines[float('inf')])
    assert sum(pulled(line) == '1' for line in lines[0.05]) >= 10, lines[0.05]


def test_the_benign_mask_learns_only_where_the_head_reads():
    """On a model whose head reads only the first half of its feature channels, CE(head(m f)) - CE(head((1 - m) f))
    (0 at m = 0.5) falls well below 0, and the ignored half gets no gradient: it stays exactly at its seeded draw."""
    x, y = images(32)
    model = select_model('WRN-10-1', 4).eval()
    half = model.feature_dim // 2
    with torch.no_grad():
        model.fc.weight[:, half:] = 0
        model.fc.weight[:, :half] *= 20
    batches = lambda name: [(x, y)]
    mask, inv = benign_mask(model, batches, args(bti_mask_epochs=100, bti_mask_lr=0.05), CPU, 0, lambda s: None)
    with torch.no_grad():
        f = inv.to_features(x)
        objective = F.cross_entropy(inv.from_features(mask * f), y) - F.cross_entropy(inv.from_features((1 - mask) * f), y)
    drawn = torch.tanh(torch.randn(mask.shape, generator=seeded(0, 'bti-mask-init-0'))) / (2 + 1e-7) + 0.5
    assert objective < -1, objective
    assert torch.equal(mask[:, half:], drawn[:, half:]) and not torch.equal(mask[:, :half], drawn[:, :half])
    assert inv is not model and not inv.training


def test_detection_votes_for_the_class_the_generated_images_go_to():
    x, y = images(40)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, 4))
    with torch.no_grad():
        model[1].weight.zero_()
        model[1].bias.copy_(torch.tensor([0., 0., 5., 0.]))  # every image goes to class 2
    target, counts = detect(Generator(), model, lambda name: [(x, y)], args(), CPU, 4)
    assert target == 2 and counts == [0, 0, 40, 0]


def test_epochs_that_do_not_split_into_its_rounds_are_one_clear_line(backdoored, image_folder, tmp_path):
    r = run_script('main_ft.py', '--dataset', 'ImageFolder', '--data_root', image_folder, '--s_model',
                   backdoored['path'], '--defense', 'btidbf', '--epochs', 5, '--bti_rounds', 2,
                   '--checkpoint_root', tmp_path / 'w', '--log_root', tmp_path / 'logs')
    assert r.returncode == 2 and 'Traceback' not in r.stderr, r.stderr
    assert r.stderr.strip() == 'error: --epochs 5 must be a multiple of --bti_rounds 2 (each round unlearns as many passes)'
    assert not (tmp_path / 'w').exists() and not (tmp_path / 'logs').exists()


@pytest.mark.slow
def test_the_pretrained_generator_is_made_once_per_model_subset_and_seed(backdoored, image_folder, tmp_path):
    """As the reference's pretrain.py writes one generator for btidbf.py and btidbfu.py: PAM-BTI after BTI-DBF(U)
    (same seed) loads it; another seed pre-trains its own."""
    data = tmp_path / 'data'
    shutil.copytree(image_folder, data, ignore=shutil.ignore_patterns('.*'))  # a cache of its own
    flags = lambda key, seed: ['--dataset', 'ImageFolder', '--data_root', data, '--s_model', backdoored['path'],
                               '--ratio', 0.5, '--checkpoint_root', tmp_path / 'w', '--log_root', tmp_path / 'logs',
                               '--seed', seed, *toy_flags(key, epochs=1)]
    said = []
    for key, seed in (('btidbf', 0), ('pam-bti', 0), ('btidbf', 1)):
        r = run_script('main_ft.py', *flags(key, seed))
        assert r.returncode == 0, r.stderr
        said.append(('pre-training pass' in r.stdout, 'the pre-trained generator of this model' in r.stdout))
    assert said == [(True, False), (False, True), (True, False)]
    assert len(list(data.glob('.bti_pretrained_*.pt'))) == 2
