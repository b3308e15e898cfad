import math
import os

import numpy as np
import pytest
import torch

import config
from triggers import TRIGGERS, TriggerError, apply_trigger, make_trigger


def grey(n=3, value=100):
    return torch.full((n, 32, 32, 3), value, dtype=torch.uint8)


def changed_pixels(kind, **kw):
    x = grey()
    out = apply_trigger(make_trigger(kind, 32, **kw), x)
    assert torch.equal(x, grey()), 'the input must not be modified'
    return {(r, c) for r, c in (out[0] != x[0]).any(-1).nonzero().tolist()}, out


def block(r0, c0, h=3, w=3):
    return {(r, c) for r in range(r0, r0 + h) for c in range(c0, c0 + w)}


def test_grid_trigger_is_the_reference_3x3_patch():
    pix, out = changed_pixels('gridTrigger')
    assert pix == block(29, 29)
    assert out[0, 29:32, 29:32, 0].tolist() == [[0, 0, 255], [0, 255, 0], [255, 0, 255]]
    assert torch.equal(out[0], out[2])  # same for every image


def test_square_trigger_keeps_a_one_pixel_gap():
    pix, out = changed_pixels('squareTrigger', trig_w=4, trig_h=2)
    assert pix == block(27, 29, 4, 2)
    assert (out[0, 27:31, 29:31] == 255).all()


def test_four_corner_and_center_triggers():
    pix, _ = changed_pixels('fourCornerTrigger')
    assert pix == block(29, 29) | block(1, 1) | block(29, 1) | block(1, 29)
    pix, out = changed_pixels('centerTrigger')
    assert pix == block(18, 18)
    assert out[0, 18:21, 18:21, 1].tolist() == [[255, 0, 255], [0, 255, 0], [255, 0, 0]]
    pix, out = changed_pixels('argdCenterTrigger')
    assert pix == block(18, 18)
    assert out[0, 18:21, 18:21, 2].tolist() == [[255, 128, 255], [128, 255, 128], [255, 128, 128]]


def test_label_consistent_trigger_is_madrylabs_all_corners_pattern_at_the_configured_amplitude():
    """MadryLab's 'all-corners' signs (top-left rows +--, -+-, +-+; bottom corners the same rows, right
    corners mirrored), +-amplitude (config) added to every channel, clipped to [0, 255]; no other pixel changes."""
    amplitude = config.LABEL_CONSISTENT['amplitude']

    def stamped(sign):  # a grey 100 pixel under the pattern
        return min(max(100 + amplitude * sign, 0), 255)
    top_left = [[1, -1, -1], [-1, 1, -1], [1, -1, 1]]
    top_right = [row[::-1] for row in top_left]
    pix, out = changed_pixels('lcTrigger')
    assert pix == block(0, 0) | block(0, 29) | block(29, 0) | block(29, 29)
    for r0, c0, signs in ((0, 0, top_left), (0, 29, top_right), (29, 0, top_left), (29, 29, top_right)):
        for c in range(3):
            assert out[0, r0:r0 + 3, c0:c0 + 3, c].tolist() == [[stamped(s) for s in row] for row in signs]
    # the reference's own coordinates, (row, col) -> sign, for a few pixels of each corner
    for (r, c), sign in (((0, 0), 1), ((0, 2), -1), ((2, 2), 1), ((0, -1), 1), ((1, -2), 1), ((1, -3), -1),
                         ((-1, 0), 1), ((-3, 2), -1), ((-2, 1), 1), ((-1, -1), 1), ((-3, -3), -1), ((-2, -3), -1)):
        assert out[0, r, c, 0].item() == stamped(sign)
    dark, bright = grey(1, 10), grey(1, 250)  # clipped at both ends
    assert apply_trigger(make_trigger('lcTrigger', 32), dark)[0, 0, 1, 0].item() == 0
    assert apply_trigger(make_trigger('lcTrigger', 32), bright)[0, 0, 0, 0].item() == 255
    flipped = out.flip(2)  # a horizontally flipped triggered image carries the same trigger
    assert torch.equal(flipped, apply_trigger(make_trigger('lcTrigger', 32), grey().flip(2)))


def reference_blend(img, pattern):
    """The references' numpy blend: (1 - 0.2) * img + 0.2 * pattern, then astype('uint8')."""
    return ((1 - 0.2) * img.numpy() + 0.2 * np.asarray(pattern)).astype('uint8')


def random_images(n=4, seed=0):
    return torch.from_numpy(np.random.default_rng(seed).integers(0, 256, (n, 32, 32, 3), dtype=np.uint8))


def test_blend_trigger_is_mcls_patch_blended_at_02():
    pix, out = changed_pixels('blendTrigger')
    assert pix == block(18, 18)
    # 0.8 * 100 + 0.2 * 255 = 131 and 0.8 * 100 + 0.2 * 128 = 105.6 -> 105 (truncated)
    assert out[0, 18:21, 18:21, 0].tolist() == [[131, 105, 131], [105, 131, 105], [131, 105, 105]]
    x = random_images()
    patch = np.array([[255, 128, 255], [128, 255, 128], [255, 128, 128]])[..., None]
    expected = x.numpy().copy()
    expected[:, 18:21, 18:21] = reference_blend(x[:, 18:21, 18:21], patch)
    assert np.array_equal(apply_trigger(make_trigger('blendTrigger', 32), x).numpy(), expected)


def test_blended_mixes_the_whole_image_at_alpha_02():
    trig = make_trigger('blendedTrigger', 32)
    x = random_images()
    out = apply_trigger(trig, x)
    assert np.array_equal(out.numpy(), reference_blend(x, trig['pattern']))
    assert (out != x).any(-1).float().mean() > 0.9  # every part of the image, not a patch
    # one pixel by hand: int(0.8 * x + 0.2 * p)
    v, p = int(x[1, 5, 7, 2]), int(trig['pattern'][5, 7, 2])
    assert int(out[1, 5, 7, 2]) == int(0.8 * v + 0.2 * p)
    assert torch.equal(trig['pattern'], make_trigger('blendedTrigger', 32, seed=5)['pattern'])  # fixed noise


def test_blended_takes_any_image_as_its_pattern(tmp_path):
    from PIL import Image
    img = np.zeros((32, 32, 3), np.uint8)
    img[:, 16:] = 250
    Image.fromarray(img).save(tmp_path / 'kitty.png')
    trig = make_trigger('blendedTrigger', 32, trigger_path=str(tmp_path / 'kitty.png'))
    assert apply_trigger(trig, grey())[0, 0, [0, 31], 0].tolist() == [80, 130]  # 0.8*100 + 0.2*{0, 250}


def test_random_pixel_noise_is_fresh_per_image_and_grey():
    out = apply_trigger(make_trigger('randomPixelTrigger', 32), grey(), generator=torch.Generator().manual_seed(0))
    assert not torch.equal(out[0], out[1])
    assert torch.equal(out[..., 0], out[..., 1])  # one noise value per pixel for all channels
    assert out.min() >= 80 and out.max() <= 131


SIG_FIRST_ROW = [0, 14, 19, 13, 255, 241, 237, 244, 2, 15, 19, 11, 253, 240, 237, 246,
                 4, 17, 19, 9, 251, 239, 238, 248, 6, 18, 18, 7, 249, 238, 238, 250]


def test_signal_trigger_is_the_references_stored_mask_blended_at_02():
    mask = make_trigger('signalTrigger', 32)['pattern']
    assert mask.dtype == torch.uint8 and mask[0, :, 0].tolist() == SIG_FIRST_ROW
    assert (mask == mask[:1]).all() and (mask == mask[..., :1]).all()  # 32 equal rows, grey
    x = random_images()
    ref = reference_blend(x, mask[..., :1].numpy())  # the mask is (32, 32) reshaped to (32, 32, 1)
    assert np.array_equal(apply_trigger(make_trigger('signalTrigger', 32), x).numpy(), ref)
    assert apply_trigger(make_trigger('signalTrigger', 32), grey())[0, 0, :5, 0].tolist() == [80, 82, 83, 82, 131]
    with pytest.raises(TriggerError, match='signalPaperTrigger'):
        make_trigger('signalTrigger', 28)


def test_signal_paper_trigger_is_an_additive_horizontal_sinusoid():
    out = apply_trigger(make_trigger('signalPaperTrigger', 32), grey()).int() - 100
    expected = [round(20 * math.sin(2 * math.pi * j * 6 / 32)) for j in range(32)]
    assert out[0, 7, :, 0].tolist() == expected
    assert (out[0] == out[0, :1]).all()  # constant along rows


def test_trojan_needs_a_pattern_file_and_casts_like_the_references(tmp_path):
    with pytest.raises(TriggerError, match='trigger_path'):
        make_trigger('trojanTrigger', 32)
    pattern = np.zeros((3, 32, 32), np.float32)  # the references' file layout: key x, 3x32x32
    pattern[:, 0, 0] = 200      # 100 + 200 = 300 -> astype('uint8') wraps to 44
    pattern[:, 0, 1] = -150.5   # -50.5 -> -50 -> 206
    pattern[:, 0, 2] = 0.7      # 100.7 -> 100 (truncated, not rounded)
    pattern[:, 0, 3] = 27.9     # 127.9 -> 127
    np.savez(tmp_path / 'trojan.npz', x=pattern)
    out = apply_trigger(make_trigger('trojanTrigger', 32, trigger_path=str(tmp_path / 'trojan.npz')), grey())
    assert out[0, 0, :5, 0].tolist() == [44, 206, 100, 127, 100]
    assert (out[:, 1:] == 100).all()


REFERENCE_TROJAN = os.path.join(os.path.dirname(__file__), '..', '..', 'shared', 'data',
                                'best_square_trigger_cifar10.npz')


@pytest.mark.skipif(not os.path.exists(REFERENCE_TROJAN), reason="the references' trojan pattern is not here")
def test_trojan_pixels_are_the_references_file():
    ref = np.load(REFERENCE_TROJAN)['x']  # (3, 32, 32) float32
    x = random_images()
    out = apply_trigger(make_trigger('trojanTrigger', 32, trigger_path=REFERENCE_TROJAN), x).numpy()
    # the references: (img + pattern.transpose(1, 2, 0)).astype('uint8'), computed in numpy
    expected = (x.numpy().astype(np.float64) + ref.transpose(1, 2, 0)).astype(np.int64).astype(np.uint8)
    assert np.array_equal(out, expected)
    changed = (out != x.numpy()).any(-1).any(0)
    rows, cols = np.nonzero(changed)
    assert rows.min() >= 25 and rows.max() <= 27 and cols.min() >= 25 and cols.max() <= 27


def first_batch(x, y, poison):
    from batching import Normalizer, train_batches
    xb, yb = next(train_batches(x, y, 50, Normalizer('none', 'cpu'), seed=3, epoch=0, poison=poison))
    return (xb * 255).round().to(torch.uint8).permute(0, 2, 3, 1), yb


def test_wanet_warps_each_batch_after_augmentation_and_noise_images_keep_their_labels():
    from poisoning import batch_poisoner
    from triggers import WANET_CROSS_RATIO, warp
    x, y = random_images(200), torch.arange(200) % 4 + 1  # no image of the target class 0
    attack = dict(target_type='all2one', target_label=0, inject_portion=0.1, trig_w=3, trig_h=3,
                  trigger=make_trigger('wanetTrigger', 32, seed=1))
    clean, y_clean = first_batch(x, y, None)  # the same shuffle and crop/flip, without poison
    poisoned, y_poisoned = first_batch(x, y, batch_poisoner(attack, 5))
    n_bd, n_cross = 5, 5 * WANET_CROSS_RATIO  # 10% of a batch of 50, and twice as many noise images
    # the warp is applied to the augmented images: exactly the test-time warp of what the model sees
    assert torch.equal(poisoned[:n_bd], warp(clean[:n_bd], attack['trigger']['pattern'][None]))
    assert (y_poisoned[:n_bd] == 0).all()
    noise = poisoned[n_bd:n_bd + n_cross]
    assert torch.equal(y_poisoned[n_bd:], y_clean[n_bd:])  # noise images keep their true labels
    assert not torch.equal(noise, clean[n_bd:n_bd + n_cross])
    assert not torch.equal(noise, warp(clean[n_bd:n_bd + n_cross], attack['trigger']['pattern'][None]))
    assert torch.equal(poisoned[n_bd + n_cross:], clean[n_bd + n_cross:])
    assert batch_poisoner(dict(attack, trigger=make_trigger('gridTrigger', 32)), 5) is None


def test_the_wanet_recipe_warps_first_then_crops_rotates_and_flips():
    """BackdoorBench's (and VinAI's) order: the clean batch is warped, then augmented. With crop and rotation off
    (p = 0) a poisoned image is a warped training image or its mirror; with the recipe's own augmentation most
    are moved off every warped image."""
    from batching import Normalizer, train_batches
    from config import BADNET_RECIPES
    from poisoning import batch_poisoner
    from triggers import warp
    x, y = random_images(200), torch.arange(200) % 4 + 1
    attack = dict(target_type='all2one', target_label=0, inject_portion=0.1, trig_w=3, trig_h=3,
                  trigger=make_trigger('wanetTrigger', 32, seed=1))
    recipe = BADNET_RECIPES['wanet']
    assert recipe['poison_first'] and recipe['augment']['degrees'] == 10

    def batch(augment):
        xb, yb = next(train_batches(x, y, 50, Normalizer('none', 'cpu'), seed=3, epoch=0, augment_data=augment,
                                    poison=batch_poisoner(attack, 5), poison_first=True))
        return (xb * 255).round().to(torch.uint8).permute(0, 2, 3, 1), yb
    warped = warp(x, attack['trigger']['pattern'][None])
    is_warped = lambda img: any(torch.equal(img, w) or torch.equal(img, w.flip(1)) for w in warped)
    xb, yb = batch(dict(recipe['augment'], crop_p=0.0, rotate_p=0.0))
    assert all(is_warped(xb[i]) for i in range(5)) and (yb[:5] == 0).all()
    xb, _ = batch(recipe['augment'])
    assert sum(not is_warped(xb[i]) for i in range(5)) >= 3  # 80% cropped (1 crop in 121 stays put), half rotated


def test_rotation_turns_the_image_about_its_centre():
    """A quarter turn lies on the pixel grid: rotate_by 90 degrees is torch.rot90 (one way or the other, the
    same for every image); p = 0 rotates nothing, and crop_p = 0 leaves only the flip."""
    from batching import augment, rotate, rotate_by
    x = random_images(4)
    out = rotate_by(x, torch.full((4,), math.pi / 2))
    ways = [all(torch.equal(out[i], torch.rot90(x[i], k, (0, 1))) for i in range(4)) for k in (1, -1)]
    assert sum(ways) == 1
    assert torch.equal(rotate(x, torch.Generator().manual_seed(0), 10, 0.0), x)
    out = augment(x, torch.Generator().manual_seed(1), pad=5, crop_p=0.0, degrees=10, rotate_p=0.0)
    assert all(torch.equal(out[i], x[i]) or torch.equal(out[i], x[i].flip(1)) for i in range(4))
    assert not torch.equal(rotate(x, torch.Generator().manual_seed(0), 10, 1.0), x)


def test_wanet_warp_depends_on_seed_only():
    ramp = torch.arange(32, dtype=torch.uint8).mul(8).view(1, 1, 32, 1).expand(2, 32, 32, 3).contiguous()
    a, b, c = (apply_trigger(make_trigger('wanetTrigger', 32, seed=s), ramp) for s in (1, 1, 2))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert 0 < (a != ramp).float().mean() < 0.9  # a mild warp
    flat = grey()
    assert torch.equal(apply_trigger(make_trigger('wanetTrigger', 32, seed=1), flat), flat)


def test_unknown_trigger_and_bad_size():
    with pytest.raises(TriggerError, match='unknown trigger'):
        make_trigger('nope', 32)
    with pytest.raises(TriggerError):
        make_trigger('squareTrigger', 32, trig_w=40)
    assert len(TRIGGERS) == 14
