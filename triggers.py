"""Backdoor triggers, applied to whole batches of uint8 images (N, H, W, C) at once.

make_trigger() builds a small dict that fully describes a trigger, including any generated
tensor (blend pattern, SIG signal, WaNet warp grid). It is stored in the checkpoint's
meta, so evaluation later uses exactly the trigger the model was trained with.
Pixel layouts follow the NAD/MCL reference code (row index first).
"""
import math

import numpy as np
import torch
import torch.nn.functional as F

import config

TRIGGERS = ('gridTrigger', 'squareTrigger', 'fourCornerTrigger', 'centerTrigger', 'argdCenterTrigger',
            'blendTrigger', 'blendedTrigger', 'randomPixelTrigger', 'signalTrigger', 'signalPaperTrigger',
            'trojanTrigger', 'wanetTrigger', 'lcTrigger', 'refoolTrigger')

BLEND_ALPHA = 0.2        # every blend of the references: 0.8 image + 0.2 pattern
BLEND_NOISE_SEED = 1234  # blendedTrigger's default pattern is the same noise image for every run
SIG_DELTA, SIG_FREQ = 20, 6  # signalPaperTrigger (SIG paper): x + 20 sin(2 pi j 6 / W)
WANET_K, WANET_S = 4, 0.5  # WaNet paper: a 4x4 control grid, warping strength 0.5
WANET_CROSS_RATIO = 2      # WaNet noise mode: per poisoned image, two images warped by a perturbed grid keep their label
# Triggers applied per training batch, after augmentation (the others poison the stored images once)
PER_BATCH = ('wanetTrigger',)

# The references' SIG mask (trigger/signal_cifar10_mask.npy of NAD, ARGD and MCL): 32 equal rows of
# a 20*sin wave stored as uint8, so its negative half wrapped around (-1 -> 255). Blended at 0.2.
SIG_MASK_ROW = (0, 14, 19, 13, 255, 241, 237, 244, 2, 15, 19, 11, 253, 240, 237, 246,
                4, 17, 19, 9, 251, 239, 238, 248, 6, 18, 18, 7, 249, 238, 238, 250)

# 3x3 checkerboard-like patch of the reference code, rows top to bottom.
GRID = ((0, 0, 255), (0, 255, 0), (255, 0, 255))      # bottom-right corner
CORNER = ((255, 0, 255), (0, 255, 0), (255, 0, 0))    # other corners (reference rows 1..3); MCL's centre patch too
ARGD_CENTER = ((255, 128, 255), (128, 255, 128), (255, 128, 128))  # ARGD's gridTrigger; MCL's blend patch
# The label-consistent attack's top-left 3x3 signs (MadryLab's 'all-corners', rows top to bottom): the
# bottom corners repeat it, the right ones mirror it left to right (a flipped image keeps a trigger)
LC_CORNER = ((1, -1, -1), (-1, 1, -1), (1, -1, 1))


class TriggerError(ValueError):
    pass


def _patches(kind, h, w, trig_w, trig_h):
    """(row0, col0, 2-D values) patches stamped by the patch triggers."""
    if kind == 'gridTrigger':
        return [(h - 3, w - 3, GRID)]
    if kind == 'squareTrigger':  # NAD/MCL leave a 1-pixel gap to the border (ARGD's copy: 3)
        return [(h - 1 - trig_w, w - 1 - trig_h, [[255] * trig_h] * trig_w)]
    if kind == 'fourCornerTrigger':
        # the reference's 'right top'/'left bottom' land at bottom-left/top-right in row-major images
        top_right = ((255, 0, 255), (0, 255, 0), (0, 0, 255))
        return [(h - 3, w - 3, GRID), (1, 1, CORNER), (h - 3, 1, CORNER[::-1]), (1, w - 3, top_right)]
    if kind == 'centerTrigger':
        return [(h - 14, w - 14, CORNER)]  # rows/cols size-14 .. size-12
    if kind in ('argdCenterTrigger', 'blendTrigger'):  # blendTrigger blends this patch at 0.2
        return [(h - 14, w - 14, ARGD_CENTER)]
    return []


def make_trigger(trigger_type, image_size, trig_w=3, trig_h=3, trigger_path=None, seed=0):
    """Describe a trigger: {'trigger_type', 'trig_w', 'trig_h', 'mask', 'pattern'} (+ 'rule': 'stamp' for a
    trojan pattern given as an image: MCL's GTSRB rule)."""
    if trigger_type not in TRIGGERS:
        raise TriggerError(f"unknown trigger '{trigger_type}' (choose from {', '.join(TRIGGERS)})")
    h = w = image_size
    if trig_w < 1 or trig_h < 1 or trig_w > h - 2 or trig_h > w - 2:
        raise TriggerError(f'trigger size {trig_w}x{trig_h} does not fit {h}x{w} images')
    mask = torch.zeros(h, w, dtype=torch.bool)
    pattern, rule = None, None
    patches = _patches(trigger_type, h, w, trig_w, trig_h)
    if patches:
        pattern = torch.zeros(h, w, 3, dtype=torch.uint8)
        for r0, c0, values in patches:
            vals = torch.tensor(values, dtype=torch.uint8)
            pattern[r0:r0 + vals.shape[0], c0:c0 + vals.shape[1]] = vals[..., None]
            mask[r0:r0 + vals.shape[0], c0:c0 + vals.shape[1]] = True
    elif trigger_type == 'blendedTrigger':  # Blended (Chen et al. 2017): the whole image, alpha 0.2
        if trigger_path:
            pattern = read_pattern_image(trigger_path, image_size)
        else:
            g = torch.Generator().manual_seed(BLEND_NOISE_SEED)
            pattern = torch.randint(0, 256, (h, w, 3), generator=g, dtype=torch.uint8)
    elif trigger_type == 'signalTrigger':
        if (h, w) != (32, 32):
            raise TriggerError(f'signalTrigger is the references\' 32x32 mask; for {h}x{w} images use signalPaperTrigger')
        pattern = torch.tensor(SIG_MASK_ROW, dtype=torch.uint8).view(1, w, 1).expand(h, w, 3).contiguous()
    elif trigger_type == 'signalPaperTrigger':
        cols = torch.arange(w, dtype=torch.float32)
        signal = SIG_DELTA * torch.sin(2 * math.pi * cols * SIG_FREQ / w)  # varies along columns
        pattern = signal.view(1, w, 1).expand(h, w, 3).contiguous()       # float, added to the image
    elif trigger_type == 'trojanTrigger':
        if not trigger_path:
            raise TriggerError("trojanTrigger needs --trigger_path: the references' trigger/best_square_trigger_cifar10.npz "
                               "(an additive pattern, key x, 3x32x32) or MCL's trigger_gtsrb.png (a stamped patch)")
        if str(trigger_path).endswith(('.npy', '.npz')):
            pattern = read_pattern_array(trigger_path, image_size)
        else:  # MCL's GTSRB/CIFAR-100 rule: where the pattern is non-zero the image is set to 0, then the pattern added
            # MCL adds the RGB pattern (PIL) to BGR images (OpenCV): in the RGB images here its channels are reversed
            pattern = read_pattern_image(trigger_path, image_size).flip(-1).contiguous()
            mask = pattern != 0  # per channel value, as numpy's nonzero on the (H, W, 3) pattern
            rule = 'stamp'
    elif trigger_type == 'lcTrigger':  # +-amplitude added to each corner's 3x3 signs, clipped
        signs = torch.tensor(LC_CORNER, dtype=torch.float32)
        pattern = torch.zeros(h, w, 3)
        for rows in (slice(0, 3), slice(h - 3, h)):
            pattern[rows, :3] = signs[..., None]
            pattern[rows, w - 3:] = signs.flip(1)[..., None]
        pattern *= config.LABEL_CONSISTENT['amplitude']
        mask = pattern[..., 0] != 0
    elif trigger_type == 'refoolTrigger':
        raise TriggerError("refoolTrigger's reflections are chosen when a Refool model is trained (train_badnet.py "
                           '--trigger_type refoolTrigger --trigger_path <another data set>, refool.py); a Refool '
                           "model's checkpoint carries them")
    elif trigger_type == 'wanetTrigger':
        g = torch.Generator().manual_seed(seed)
        ins = torch.rand(1, 2, WANET_K, WANET_K, generator=g) * 2 - 1
        ins = ins / ins.abs().mean()
        noise = F.interpolate(ins, size=h, mode='bicubic', align_corners=True).permute(0, 2, 3, 1)
        lin = torch.linspace(-1, 1, h)
        xx, yy = torch.meshgrid(lin, lin, indexing='ij')
        identity = torch.stack((yy, xx), 2)[None]
        pattern = torch.clamp(identity + WANET_S * noise / h, -1, 1)[0]  # the sampling grid (H, W, 2)
    trigger = {'trigger_type': trigger_type, 'trig_w': trig_w, 'trig_h': trig_h, 'mask': mask, 'pattern': pattern}
    return dict(trigger, rule=rule) if rule else trigger


def refool_trigger(reflections, weights):
    """Refool's trigger: reflection layers (K, H, W, 3) uint8, each test or poisoned image blended with one drawn
    in proportion to weights (K,) (refool.py chooses both)."""
    h, w = reflections.shape[1:3]
    return {'trigger_type': 'refoolTrigger', 'trig_w': 3, 'trig_h': 3, 'mask': torch.zeros(h, w, dtype=torch.bool),
            'pattern': reflections, 'weights': weights.double()}


def reflect(x, r):
    """Refool's blend (strategy.py's blend_image) of uint8 images x with reflections r, both (N, H, W, C): weights
    in proportion to each image's mean brightness, in float64, clipped and truncated to uint8 as the reference."""
    x, r = x.double(), r.to(x.device).double()
    mx, mr = x.mean((1, 2, 3), keepdim=True), r.mean((1, 2, 3), keepdim=True)
    total = (mx + mr).clamp_min(1e-12)  # two black images: x kept
    return ((mx / total * x / 255 + mr / total * r / 255).clamp(0, 1) * 255).to(torch.uint8)


def read_pattern_image(path, image_size):
    from PIL import Image
    try:
        img = Image.open(path).convert('RGB').resize((image_size, image_size))
    except (OSError, ValueError) as e:
        raise TriggerError(f'cannot read trigger image {path}: {e}')
    return torch.from_numpy(np.array(img, dtype=np.uint8))


def read_pattern_array(path, image_size):
    """Additive pattern in pixel units, HxWxC or CxHxW, from .npy/.npz (key 'x' or the first)."""
    try:
        arr = np.load(path, allow_pickle=False)
        if isinstance(arr, np.lib.npyio.NpzFile):
            arr = arr['x'] if 'x' in arr.files else arr[arr.files[0]]
    except (OSError, ValueError, KeyError, IndexError) as e:
        raise TriggerError(f'cannot read trigger pattern {path}: {e}')
    t = torch.as_tensor(np.asarray(arr, dtype=np.float32))
    if t.ndim == 3 and t.shape[0] == 3 and t.shape[-1] != 3:
        t = t.permute(1, 2, 0)
    if t.shape != (image_size, image_size, 3):
        raise TriggerError(f'trigger pattern {path} has shape {tuple(t.shape)}, expected {image_size}x{image_size}x3')
    return t.contiguous()


def apply_trigger(trigger, x, generator=None):
    """Return triggered copies of uint8 images x (N, H, W, C); x is not modified."""
    kind, pattern = trigger['trigger_type'], trigger['pattern']
    if x.shape[0] == 0:
        return x.clone()
    if kind in ('gridTrigger', 'squareTrigger', 'fourCornerTrigger', 'centerTrigger', 'argdCenterTrigger'):
        mask = trigger['mask'].to(x.device)[None, :, :, None]
        return torch.where(mask, pattern.to(x.device)[None], x)
    if kind == 'blendTrigger':  # MCL: only the patch's pixels are blended
        mask = trigger['mask'].to(x.device)[None, :, :, None]
        return torch.where(mask, _blend(x, pattern.to(x.device)[None]), x)
    if kind in ('blendedTrigger', 'signalTrigger'):
        return _blend(x, pattern.to(x.device)[None])
    if kind == 'randomPixelTrigger':  # fresh grey-level noise per image, shared by the channels
        n, h, w, _ = x.shape
        noise = torch.randint(0, 256, (n, h, w, 1), generator=generator, dtype=torch.uint8)
        return _blend(x, noise.to(x.device))
    if kind == 'trojanTrigger' and trigger.get('rule') == 'stamp':  # MCL's GTSRB: zeroed, then the pattern added
        return torch.where(trigger['mask'].to(x.device)[None], pattern.to(x.device)[None], x)
    if kind == 'trojanTrigger':
        # the references compute (img + pattern).astype('uint8'): truncation, then wrap-around modulo 256
        return (x.double() + pattern.to(x.device, torch.float64)[None]).trunc().long().remainder(256).to(torch.uint8)
    if kind == 'signalPaperTrigger':
        return (x.float() + pattern.to(x.device)[None]).round().clamp(0, 255).to(torch.uint8)
    if kind == 'refoolTrigger':  # a reflection per image, drawn by the weights
        pick = torch.multinomial(trigger['weights'].to(x.device), len(x), replacement=True, generator=generator)
        return reflect(x, pattern.to(x.device)[pick])
    if kind == 'lcTrigger':  # the reference adds in float32, clips, and stores uint8 (truncation)
        return (x.float() + pattern.to(x.device)[None]).clamp(0, 255).to(torch.uint8)
    if kind == 'wanetTrigger':
        return warp(x, pattern.to(x.device)[None])
    raise TriggerError(f"unknown trigger '{kind}'")


def warp(x, grids):
    """uint8 images (N, H, W, C) resampled (bilinear) at a sampling grid (1 or N, H, W, 2), rounded to uint8."""
    out = []
    for i in range(0, len(x), 4096):  # bounded memory for 50k-image sets
        img = x[i:i + 4096].permute(0, 3, 1, 2).float()
        grid = grids[i:i + 4096] if grids.shape[0] > 1 else grids.expand(img.shape[0], -1, -1, -1)
        warped = F.grid_sample(img, grid, align_corners=True)
        out.append(warped.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1))
    return torch.cat(out).contiguous()


def wanet_noise_grids(grid, n, generator):
    """WaNet's noise mode: n copies of the warp grid (H, W, 2), each moved by its own uniform noise of
    at most 1/H in grid units (half a pixel), clamped to the image, as WaNet computes it."""
    h = grid.shape[0]
    noise = torch.rand(n, *grid.shape, generator=generator, device=grid.device) * 2 - 1
    return (grid[None] + noise / h).clamp(-1, 1)


def _blend(x, pattern):
    """(1 - alpha) * x + alpha * pattern in float64 and truncated to uint8, as the references' numpy
    code computes it (the same operations in the same order: pixel-identical)."""
    return ((1 - BLEND_ALPHA) * x.double() + BLEND_ALPHA * pattern.double()).to(torch.uint8)
