"""Batches on the device: normalisation, crop + flip + Cutout on whole batches, one epoch's shuffled batches
(their order a function of the seed and the epoch alone: what makes a resumed run repeat the uninterrupted one)."""
import math

import torch
import torch.nn.functional as F

import config
from errors import UserError
from subsets import seeded


def parse_normalize(spec):
    """'cifar' | 'none' | 'm1,m2,m3,s1,s2,s3' -> [m1, m2, m3, s1, s2, s3]."""
    if spec in config.NORMALIZATIONS:
        mean, std = config.NORMALIZATIONS[spec]
        return list(mean) + list(std)
    try:
        values = [float(v) for v in spec.split(',')]
    except ValueError:
        values = []
    if len(values) != 6 or min(values[3:]) <= 0:
        raise UserError(f"--normalize must be 'cifar', 'none' or six numbers 'm1,m2,m3,s1,s2,s3' with std > 0, got '{spec}'")
    return values


class Normalizer:
    """uint8 NHWC -> float NCHW (channels_last memory), scaled to [0,1] and normalised."""

    def __init__(self, values, device):
        values = parse_normalize(values) if isinstance(values, str) else list(values)
        self.values = values
        self.mean = torch.tensor(values[:3], device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(values[3:], device=device).view(1, 3, 1, 1)

    def __call__(self, x_uint8):
        return self.normalize_float(x_uint8.permute(0, 3, 1, 2).float().div_(255))

    def normalize_float(self, x01):
        return (x01 - self.mean) / self.std


def default_normalize(dataset):
    return list(sum(config.NORMALIZATIONS[config.DATASETS[dataset]['normalize']], ()))


def augment(x, generator, pad=4, cutout=0, crop_flip=True, crop_p=1.0, degrees=0, rotate_p=0.0):
    """Random crop with zero padding and horizontal flip on a uint8 NHWC batch, on its device (not
    with crop_flip=False: GTSRB); with cutout > 0 also NAD/ARGD's Cutout(1, cutout): a black square
    around a random centre, rows/cols [c - cutout//2, c + cutout//2) clipped to the image (2x2 for 3).
    WaNet's PostTensorTransform adds crop_p (the share of images cropped) and a rotation by a uniform angle
    in [-degrees, degrees] of a rotate_p share of the images (after the flip: the angle's law is symmetric,
    so the order of the two does not change what an image can become)."""
    n, h, w, c = x.shape
    out = crop_and_flip(x, generator, pad, crop_p) if crop_flip else x
    if degrees:
        out = rotate(out, generator, degrees, rotate_p)
    if cutout:
        centres = torch.stack((torch.randint(0, h, (n,), generator=generator, device=x.device),
                               torch.randint(0, w, (n,), generator=generator, device=x.device)))
        inside = lambda size, c0: ((torch.arange(size, device=x.device) >= c0[:, None] - cutout // 2)
                                   & (torch.arange(size, device=x.device) < c0[:, None] + cutout // 2))
        hole = inside(h, centres[0])[:, :, None] & inside(w, centres[1])[:, None, :]
        out = out.masked_fill(hole[..., None], 0)
    return out


def crop_and_flip(x, generator, pad, crop_p=1.0):
    n, h, w, c = x.shape
    padded = torch.zeros(n, h + 2 * pad, w + 2 * pad, c, dtype=x.dtype, device=x.device)
    padded[:, pad:pad + h, pad:pad + w] = x
    shifts = torch.randint(0, 2 * pad + 1, (2, n), generator=generator, device=x.device)
    flips = torch.rand(n, generator=generator, device=x.device) < 0.5
    if crop_p < 1:  # the images left uncropped read the padded image at its centre
        kept = torch.rand(n, generator=generator, device=x.device) >= crop_p
        shifts = torch.where(kept[None], torch.full_like(shifts, pad), shifts)
    rows = shifts[0, :, None] + torch.arange(h, device=x.device)
    cols = shifts[1, :, None] + torch.arange(w, device=x.device)
    cols = torch.where(flips[:, None], cols.flip(1), cols)  # flipping = reading columns backwards
    return padded[torch.arange(n, device=x.device)[:, None, None], rows[:, :, None], cols[:, None, :]]


def rotate(x, generator, degrees, p):
    """A p share of a uint8 NHWC batch rotated about the centre by uniform angles in [-degrees, degrees], one per
    image (bilinear, zeros outside: VinAI's WaNet uses kornia's per-image RandomRotation; BackdoorBench's
    torchvision one turns a whole batch by one angle), rounded to uint8."""
    n = len(x)
    angle = (torch.rand(n, generator=generator, device=x.device) * 2 - 1) * math.radians(degrees)
    return rotate_by(x, angle * (torch.rand(n, generator=generator, device=x.device) < p))


def rotate_by(x, angle):
    """A uint8 NHWC batch, each image rotated about its centre by its angle (radians), bilinear, zeros outside."""
    cos, sin = torch.cos(angle), torch.sin(angle)
    zero = torch.zeros_like(cos)
    theta = torch.stack((torch.stack((cos, -sin, zero), 1), torch.stack((sin, cos, zero), 1)), 1)
    img = x.permute(0, 3, 1, 2).float()
    grid = F.affine_grid(theta, list(img.shape), align_corners=True)
    out = F.grid_sample(img, grid, mode='bilinear', padding_mode='zeros', align_corners=True)
    return out.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1)


def train_batches(x, y, batch_size, normalizer, seed, epoch, augment_data=True, drop_last=False, cutout=0,
                  shard=(0, 1), poison=None, crop_flip=True, poison_first=False):
    """One epoch of shuffled, augmented, normalised batches; the order depends on (seed, epoch) only,
    which is what makes a resumed run repeat the uninterrupted one exactly. shard=(rank, world):
    each process of a distributed run gets every world-th image of each global batch, cut after
    the whole batch is augmented, so the global batches are those of a single process. poison (see
    batch_poisoner) runs on each batch after augmentation, so crop and flip cannot move its trigger, or, with
    poison_first (WaNet's reference), before it. augment_data may be a dict of augment()'s WaNet keywords."""
    g = seeded(seed, f'batches-{epoch}', x.device)  # every draw of the epoch on the data's device
    order = torch.randperm(len(y), generator=g, device=x.device)
    stop = len(y) - (len(y) % batch_size if drop_last and len(y) >= batch_size else 0)
    rank, world = shard
    for i in range(0, stop, batch_size):
        idx = order[i:i + batch_size]
        xb, yb = x[idx], y[idx]
        if poison is not None and poison_first:
            xb, yb = poison(xb, yb, g)
        if augment_data and (crop_flip or cutout):
            xb = augment(xb, g, cutout=cutout, crop_flip=crop_flip, **(augment_data if isinstance(augment_data, dict) else {}))
        if poison is not None and not poison_first:
            xb, yb = poison(xb, yb, g)
        yield normalizer(xb[rank::world]), yb[rank::world]
