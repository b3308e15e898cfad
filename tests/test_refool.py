"""Refool (refoolTrigger): the blend, the reflection models at the reference's scale, the blur, vignette and SSIM by hand, the
strategy's weights, and the chosen trigger made, cached and served by DatasetBD."""
import math
import os
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import refool
from cli import parse_args
from data_loader import DatasetBD
from decoding import load_dataset
from errors import UserError
from poisoning import poison_train_set
from refool import (HYP, gaussian_blur, keep, new_weights, reflection_images, reflection_trigger, resized, ssim,
                    vignette)
from triggers import apply_trigger, reflect, refool_trigger


def const(value, size=32):
    return torch.full((1, size, size, 3), value, dtype=torch.uint8)


def test_blend_weights_each_image_by_its_mean_brightness():
    """strategy.py's blend_image: 100 and 50 mix as 2/3 and 1/3 -> 83.33, truncated to 83; black stays black."""
    assert (reflect(const(100), const(50)) == 83).all()
    assert (reflect(const(0), const(0)) == 0).all()
    x = torch.randint(0, 256, (2, 32, 32, 3), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    r = torch.randint(0, 256, (2, 32, 32, 3), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)
    mx, mr = x.double().mean((1, 2, 3)), r.double().mean((1, 2, 3))
    want = np.uint8(np.clip((mx / (mx + mr)).view(-1, 1, 1, 1).numpy() * x.numpy() / 255.
                            + (mr / (mx + mr)).view(-1, 1, 1, 1).numpy() * r.numpy() / 255., 0, 1) * 255)
    assert np.array_equal(reflect(x, r).numpy(), want)


def test_the_trigger_draws_a_reflection_per_image_by_its_weight():
    reflections = torch.cat([const(0), const(200)])
    x = const(100).expand(5, -1, -1, -1).contiguous()
    out = apply_trigger(refool_trigger(reflections, torch.tensor([0.0, 1.0])), x, torch.Generator().manual_seed(0))
    assert (out == reflect(const(100), const(200))).all() and (x == 100).all()
    out = apply_trigger(refool_trigger(reflections, torch.tensor([1.0, 0.0])), x, torch.Generator().manual_seed(0))
    assert (out == 100).all()  # blended with black: weight 0


def test_gaussian_blur_is_cv2s_with_the_border_reflected():
    img = torch.rand(9, 9, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    sigma = 1.2
    k = int(2 * math.ceil(2 * sigma) + 1)  # 7
    taps = np.exp(-(np.arange(k) - 3) ** 2 / (2 * sigma ** 2))
    taps /= taps.sum()
    reflect101 = lambda i: -i if i < 0 else 2 * 8 - i if i > 8 else i  # ... 2 1 | 0 1 2 ... 8 | 7 6 ...
    out = gaussian_blur(img, sigma)
    for r, c in ((0, 0), (4, 4), (8, 1), (2, 7)):
        want = sum(taps[a] * taps[b] * img[reflect101(r + a - 3), reflect101(c + b - 3)]
                   for a in range(k) for b in range(k))
        assert torch.allclose(out[r, c], want, atol=1e-12)


def test_vignette_is_gen_kernel():
    v = vignette(4, 3)
    d = 7 / 4
    edges = [-3 - d / 2 + i * (6 + d) / 4 for i in range(5)]  # linspace(-3 - d/2, 3 + d/2, 5)
    cdf = lambda z: 0.5 * (1 + math.erf(z / math.sqrt(2)))
    mass = [cdf(edges[i + 1]) - cdf(edges[i]) for i in range(4)]
    raw = np.sqrt(np.outer(mass, mass))
    assert np.allclose(v.numpy(), raw / raw.max(), atol=1e-12) and v.max() == 1 and torch.equal(v, v.T)


def test_the_two_reflection_models_on_a_hand_made_pair():
    """Flat scene 0.5 and reflection 0.25, transmission weight 0.8, in linear light (gamma 2.2): a ghost of a flat
    reflection is the flat reflection, 0.2 of it added; the out-of-focus one blurs (flat: unchanged) and fades
    it by the vignette times (1 - 0.8 / 2)."""
    t, r, a, g = torch.full((32, 32, 3), 0.5), torch.full((32, 32, 3), 0.25), 0.8, 2.2
    blended, transmission, reflection = reflection_images(t, r, 'ghost', {'alpha_t': a, 'offset': (3, 5),
                                                                         'ghost_alpha': 0.3})
    assert (blended == int(255 * (0.2 * 0.25 ** g + a * 0.5 ** g) ** (1 / g))).all()
    assert (transmission == int(255 * (a * 0.5 ** g) ** (1 / g))).all()
    assert (reflection == int(255 * (0.2 * 0.25 ** g) ** (1 / g))).all()
    blended, _, reflection = reflection_images(t, r, 'blur', {'alpha_t': a, 'sigma': 2.0, 'att': 1.1})
    mask = 0.25 ** g * vignette(32)[..., None] * (1 - a / 2)
    assert torch.equal(blended, ((mask + a * 0.5 ** g) ** (1 / g) * 255).to(torch.uint8).expand(-1, -1, 3))
    assert torch.equal(reflection, ((4 * (1 - a) * mask) ** (1 / g) * 255).to(torch.uint8).expand(-1, -1, 3))


def test_a_ghost_is_two_shifted_copies():
    """One bright pixel of the reflection becomes two spots, (dy, dx) apart before the resize, weighted
    ghost_alpha and 1 - ghost_alpha."""
    r = torch.zeros(32, 32, 3)
    r[12, 12] = 1.0
    _, _, layer = reflection_images(torch.zeros(32, 32, 3), r, 'ghost', {'alpha_t': 0.5, 'offset': (6, 6),
                                                                          'ghost_alpha': 0.2})
    lit = layer[..., 0].double()
    spots = [lit[:10, :10].sum(), lit[10:, 10:].sum()]  # near (12 - 6, 12 - 6) * 32 / 26 and (12, 12) * 32 / 26
    assert spots[0] > 0 and spots[1] > spots[0]  # the 0.8 copy brighter than the 0.2 copy


def test_a_ghost_made_at_the_references_scale_stays_one_spot_at_32_px():
    """Made at 560 px (as blend_images), a ghost's 8-px shift is half a pixel at 32 px: the bright 2x2 block of
    the reflection comes back where it was, as one spot (at 32 px the copies would be 8 pixels apart)."""
    r = torch.zeros(32, 32, 3, dtype=torch.float64)
    r[12:14, 12:14] = 1.0
    t = resized(torch.zeros(32, 32, 3, dtype=torch.float64), HYP['scale'])
    _, _, layer = reflection_images(t, resized(r, HYP['scale']), 'ghost',
                                    {'alpha_t': 0.5, 'offset': (8, 8), 'ghost_alpha': 0.2})
    assert layer.shape == (HYP['scale'], HYP['scale'], 3)
    small = resized(layer.double(), 32)[..., 0]
    lit = torch.nonzero(small > 0.5 * small.max())
    assert lit.min() >= 11 and lit.max() <= 14  # one spot, on the block
    far = small.clone()
    far[10:16, 10:16] = 0
    assert far.max() < 0.1 * small.max()  # no second copy anywhere else
    assert torch.allclose(resized(r, 32), r)  # resizing to the same size changes nothing


def test_ssim_is_skimages_on_flat_images_and_one_for_equal_images():
    x = torch.randint(0, 256, (16, 16, 3), generator=torch.Generator().manual_seed(2), dtype=torch.uint8)
    assert ssim(x, x) == pytest.approx(1.0, abs=1e-12)
    c1 = (0.01 * 255) ** 2  # flat windows: no variance, so only the means' term is left
    assert ssim(const(100)[0], const(120)[0]) == pytest.approx((2 * 100 * 120 + c1) / (100 ** 2 + 120 ** 2 + c1))


def test_a_candidate_must_leave_the_scene_dominant_bright_and_in_the_ssim_band():
    scene = torch.randint(40, 220, (32, 32, 3), generator=torch.Generator().manual_seed(3), dtype=torch.uint8)
    assert not keep(scene, scene, torch.full_like(scene, 200))   # the reflection outshines the rest
    assert not keep(const(10)[0], const(10)[0], const(0)[0])      # too dark
    assert not keep(scene, scene, torch.zeros_like(scene))         # SSIM 1: no visible reflection


def test_new_weights_are_measured_success_rates_and_the_median_elsewhere():
    w = new_weights(torch.tensor([2., 0., 0., 5.]), torch.tensor([4., 2., 0., 5.]))
    assert w.tolist() == [0.5, 0.0, 0.5, 1.0]
    assert new_weights(torch.zeros(3), torch.ones(3)).tolist() == [1.0, 1.0, 1.0]  # nothing worked: uniform


def source_folder(root, n=400):
    """Smooth random colour fields (upsampled 4x4 noise): reflection sources unlike the scenes."""
    from PIL import Image
    rng = np.random.default_rng(5)
    for split, count in (('train', n), ('test', 2)):
        for c in ('a', 'b'):
            d = os.path.join(root, split, c)
            os.makedirs(d)
            for i in range(count // 2):
                Image.fromarray(rng.integers(0, 256, (4, 4, 3)).astype(np.uint8)).resize(
                    (32, 32), Image.BILINEAR).save(os.path.join(d, f'{i}.png'))
    return root


def test_the_strategy_chooses_weights_caches_them_and_dataset_bd_serves_the_trigger(image_folder, tmp_path,
                                                                                 monkeypatch, capsys):
    monkeypatch.setitem(HYP, 'candidates', 8)
    monkeypatch.setitem(HYP, 'rounds', 2)
    monkeypatch.setitem(HYP, 'proxy_epochs', 1)
    root = str(tmp_path / 'data')
    shutil.copytree(image_folder, root, ignore=shutil.ignore_patterns('.*'))
    source = source_folder(str(tmp_path / 'source'))
    args = parse_args('train_badnet.py', ['--dataset', 'ImageFolder', '--data_root', root, '--arch', 'WRN-10-1',
                                          '--trigger_type', 'refoolTrigger', '--trigger_path', source, '--target_type',
                                          'cleanLabel', '--inject_portion', 0.4, '--batch_size', 32, '--threads', 1,
                                          '--log_root', tmp_path, '--precision', 'fp32'])
    args.amp, args.eval_batch_size = False, 256  # what device.setup gives on the CPU in fp32
    trigger = reflection_trigger(args, torch.device('cpu'))
    out = capsys.readouterr().out
    assert 'round 2/2' in out and 'cached in' in out
    assert trigger['pattern'].shape == (8, 32, 32, 3) and trigger['weights'].shape == (8,)
    assert torch.equal(reflection_trigger(args, torch.device('cpu'))['weights'], trigger['weights'])
    assert 'read from' in capsys.readouterr().out
    data = load_dataset('ImageFolder', root, verbose=False)
    items = list(zip(data['x_train'].numpy(), data['y_train'].tolist()))
    opt = SimpleNamespace(target_label=0, trig_w=3, trig_h=3, trigger_type='refoolTrigger', target_type='cleanLabel',
                          seed=0)
    bd = DatasetBD(opt, items, 0.4, trigger=trigger)
    assert len(bd.poisoned) == 40 and (data['y_train'][bd.poisoned] == 0).all() and torch.equal(bd.y, data['y_train'])
    x, _, _ = poison_train_set(data['x_train'], data['y_train'], bd.attack, 4, 0)
    assert torch.equal(x, bd.x) and not torch.equal(x[bd.poisoned], data['x_train'][bd.poisoned])


def test_candidates_are_seeded_and_each_passes_the_test(image_folder, tmp_path):
    scenes = load_dataset('ImageFolder', image_folder, verbose=False)['x_train']
    sources = load_dataset('ImageFolder', source_folder(str(tmp_path / 's'), 200), verbose=False)['x_train']
    a, kinds = refool.candidates(sources, scenes, 0, 5)
    b, _ = refool.candidates(sources, scenes, 0, 5)
    assert torch.equal(a, b) and len(kinds) == 5 and set(kinds) <= set(refool.MODELS)
    with pytest.raises(UserError, match='needed'):
        refool.candidates(sources[:3], scenes, 0, 5)
