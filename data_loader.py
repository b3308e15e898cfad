"""Data: decode once to uint8 tensors, poison in one vectorised pass, batch on the device.

A data set lives as x (N, H, W, C) uint8 and y (N,) int64. Images are decoded once and
cached next to the data (or in ~/.cache/backdoor-erasing when that is read-only), so later
runs start in seconds. Training batches are cut from tensors already on the device, with
random crop (pad 4), horizontal flip and normalisation done on the whole batch.

For a training loop of one's own: the references' DatasetBD (the poisoned set), DatasetCL (the
defender's clean subset) and get_train_loader / get_test_loader / get_backdoor_loader, built on the
same vectorised poisoning, pixel for pixel what the project's scripts train and score on.
"""
import hashlib
import os
import zlib
from types import SimpleNamespace

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

import config
from checkpoints import resolve
from errors import UserError
from files import atomic_save
from triggers import PER_BATCH, WANET_CROSS_RATIO, TriggerError, apply_trigger, make_trigger, wanet_noise_grids, warp

IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.ppm', '.bmp', '.webp', '.tif', '.tiff')
CACHE_VERSION = 1


# ----------------------------------------------------------------------------- loading
def load_dataset(name, root, image_size=None, verbose=True):
    """-> dict(x_train, y_train, x_test, y_test, classes) with uint8 NHWC images."""
    num_classes, default_size = config.DATASETS[name]['classes'], config.DATASETS[name]['size']
    size = image_size or default_size
    if _is_image_folder(root):
        data = _cached(root, f'folder{size}', lambda: _read_image_folder(root, size, verbose), verbose)
        if num_classes is not None and len(data['classes']) != num_classes:
            raise UserError(f"{root} has {len(data['classes'])} class folders, {name} has {num_classes}")
        return data
    if name == 'ImageFolder':
        raise UserError(f'{root} is not an image folder: expected {root}/train/<class>/* and {root}/test/<class>/*')
    if size != default_size:
        raise UserError(f'{name} from torchvision is {default_size}x{default_size}; for other sizes use an image folder')
    return _cached(root, f'{name}{size}', lambda: _read_torchvision(name, root, size, verbose), verbose)


def _is_image_folder(root):
    return os.path.isdir(os.path.join(root, 'train')) and os.path.isdir(os.path.join(root, 'test'))


def _cached(root, key, build, verbose):
    path = cache_path(root, f'decoded_{key}')
    fingerprint = data_fingerprint(root)
    if os.path.exists(path):
        try:
            data = torch.load(path, weights_only=True, map_location='cpu')
            if data.get('version') == CACHE_VERSION and data.get('fingerprint') == fingerprint:
                return data
        except Exception:  # a broken cache is rebuilt, never trusted
            pass
    data = build()
    data.update(version=CACHE_VERSION, fingerprint=fingerprint)
    try:
        atomic_save(data, path)
        if verbose:
            print(f'cached decoded images in {path}')
    except OSError:
        pass  # read-only everywhere: still works, just decodes again next time
    return data


def cache_path(root, name):
    """Where something made from the data set at root is kept (decoded images, the label-consistent
    attack's robust model and images): beside the data, or in ~/.cache/backdoor-erasing when that is read-only."""
    root = os.path.abspath(root)
    if os.path.isdir(root) and os.access(root, os.W_OK):
        return os.path.join(root, f'.{name}.pt')
    digest = hashlib.sha1(root.encode()).hexdigest()[:12]
    return os.path.join(os.path.expanduser('~/.cache/backdoor-erasing'), f'{digest}_{name}.pt')


def data_fingerprint(root):
    """Cheap identity of an image folder (class names and file counts) so a changed tree is re-read."""
    if not _is_image_folder(root):
        return 'torchvision'
    parts = []
    for split in ('train', 'test'):
        for cls in sorted(os.listdir(os.path.join(root, split))):
            d = os.path.join(root, split, cls)
            if os.path.isdir(d):
                parts.append(f'{split}/{cls}:{len(os.listdir(d))}')
    return ';'.join(parts)


def _read_image_folder(root, size, verbose):
    from PIL import Image
    from tqdm import tqdm
    classes = sorted(d for d in os.listdir(os.path.join(root, 'train')) if os.path.isdir(os.path.join(root, 'train', d)))
    if not classes:
        raise UserError(f'{root}/train has no class folders')
    out = {'classes': classes}
    for split in ('train', 'test'):
        files, labels = [], []
        for i, cls in enumerate(classes):
            d = os.path.join(root, split, cls)
            names = sorted(f for f in os.listdir(d) if f.lower().endswith(IMAGE_EXTENSIONS)) if os.path.isdir(d) else []
            files += [os.path.join(d, f) for f in names]
            labels += [i] * len(names)
        if not files:
            raise UserError(f'{root}/{split} has no images in folders named like {root}/train')
        x = np.empty((len(files), size, size, 3), dtype=np.uint8)
        # a bar for the human at a terminal only (disable=None: off when stderr is not a TTY)
        bar = tqdm(files, desc=f'decoding {split}', disable=None if verbose else True, mininterval=2)
        for j, f in enumerate(bar):
            try:
                with Image.open(f) as img:
                    img = img.convert('RGB')
                    if img.size != (size, size):
                        img = img.resize((size, size), Image.BILINEAR)
                    x[j] = np.asarray(img)
            except (OSError, ValueError) as e:
                raise UserError(f'cannot decode image {f}: {e}')
        out[f'x_{split}'] = torch.from_numpy(x)
        out[f'y_{split}'] = torch.tensor(labels, dtype=torch.int64)
    return out


def _read_torchvision(name, root, size, verbose):
    import torchvision
    from PIL import Image
    from tqdm import tqdm
    out = {}
    try:
        for split, train in (('train', True), ('test', False)):
            if name == 'GTSRB':
                ds = torchvision.datasets.GTSRB(root, split='train' if train else 'test', download=True)
                bar = tqdm(range(len(ds)), desc=f'decoding GTSRB {split}', disable=None if verbose else True, mininterval=2)
                x = np.stack([np.asarray(ds[i][0].convert('RGB').resize((size, size), Image.BILINEAR)) for i in bar])
                y = [ds._samples[i][1] for i in range(len(ds))]
                out['classes'] = [str(i) for i in range(43)]
            else:
                cls = getattr(torchvision.datasets, name)
                ds = cls(root, train=train, download=True)
                x, y = ds.data, ds.targets
                out['classes'] = list(ds.classes)
            out[f'x_{split}'] = torch.from_numpy(np.ascontiguousarray(x, dtype=np.uint8))
            out[f'y_{split}'] = torch.as_tensor(y, dtype=torch.int64)
    except UserError:
        raise
    except Exception as e:  # offline: URLError, checksum or extraction failure
        raise UserError(f'{name} is not in {root} and could not be downloaded ({type(e).__name__}); download it '
                        f'there, or pass --data_root <dir> with <dir>/train/<class>/*, <dir>/test/<class>/*')
    return out


# ----------------------------------------------------------------------------- poisoning
def seeded(seed, stream, device='cpu'):
    """An independent generator per purpose: poisoned indices, the clean subset and the batch
    order must not share one random stream (they would pick the same images). On the device of the
    tensors it draws for (per-batch draws need no host copy; a CUDA stream's numbers are not the CPU's)."""
    return torch.Generator(device=device).manual_seed((seed * 1000003 + zlib.crc32(stream.encode())) % 2 ** 62)


def make_attack(args, image_size, num_classes, meta_attack=None, trigger=None):
    """Resolve the attack: a flag given, else the checkpoint's meta, else config.ATTACK; trigger: the trigger
    itself where no flag can describe it (Refool's reflections, refool.reflection_trigger)."""
    meta_attack = meta_attack or {}
    attack = {k: resolve(args, k, meta_attack.get(k)) for k in config.ATTACK if k != 'trigger_path'}
    if not 0 <= attack['target_label'] < num_classes:
        raise UserError(f"target label {attack['target_label']} is outside [0, {num_classes})")
    if attack['trigger_type'] == 'lcTrigger' and attack['target_type'] != 'cleanLabel':
        raise UserError('lcTrigger is the label-consistent attack: it poisons target-class images only, '
                        'labels kept (add --target_type cleanLabel)')
    same_trigger = (meta_attack.get('trigger_type') == attack['trigger_type']
                    and meta_attack.get('trig_w') == attack['trig_w'] and meta_attack.get('trig_h') == attack['trig_h']
                    and 'trigger_path' not in getattr(args, 'given', ()))
    if trigger is not None:
        attack['trigger'] = trigger
    elif same_trigger and 'trigger' in meta_attack:  # the model's own generated trigger (WaNet grid, blend noise)
        attack['trigger'] = meta_attack['trigger']
    else:
        try:
            attack['trigger'] = make_trigger(attack['trigger_type'], image_size, attack['trig_w'], attack['trig_h'],
                                             getattr(args, 'trigger_path', None), seed=args.seed)
        except TriggerError as e:
            raise UserError(str(e))
    return attack


def poison_train_set(x, y, attack, num_classes, seed, static=False, hard=None):
    """Poison attack['inject_portion'] of the set (of the target class for cleanLabel).

    Returns (x_poisoned, y_poisoned, poisoned_indices); the chosen indices depend on seed only.
    Triggers applied per batch (WaNet) leave the stored set clean (see batch_poisoner), unless static
    (DatasetBD's copy: the share warped once). hard: a copy of x whose poisoned images are stamped
    instead of x's (the label-consistent attack's PGD images, label_consistent.hard_images).
    """
    if attack['trigger']['trigger_type'] in PER_BATCH and not static:
        return x, y, torch.zeros(0, dtype=torch.long)
    g = seeded(seed, 'poison')
    kind, target = attack['target_type'], attack['target_label']
    pool = torch.nonzero(y == target).flatten() if kind == 'cleanLabel' else torch.arange(len(y))
    n = int(len(pool) * attack['inject_portion'])
    idx = pool[torch.randperm(len(pool), generator=g)[:n]].sort().values
    x, y = x.clone(), y.clone()
    x[idx] = apply_trigger(attack['trigger'], (x if hard is None else hard)[idx], generator=g)
    y[idx] = poisoned_labels(y[idx], attack, num_classes)
    return x, y, idx


def target_labels(y, attack, num_classes):
    """What the attack wants the model to say for triggered images of true class y."""
    if attack['target_type'] == 'all2all':
        return (y + 1) % num_classes
    return torch.full_like(y, attack['target_label'])


def poisoned_labels(y, attack, num_classes):
    """The labels poisoned training images carry: the target's, or their own under cleanLabel."""
    return y.clone() if attack['target_type'] == 'cleanLabel' else target_labels(y, attack, num_classes)


def batch_poisoner(attack, num_classes):
    """For triggers applied per training batch (WaNet, as its paper trains it), a function
    (x_uint8, y, generator) -> (x, y) run on each augmented batch: the first inject_portion of the
    (shuffled) batch is warped and relabelled, the next WANET_CROSS_RATIO times as many are warped by
    randomly perturbed grids and keep their labels (noise mode). None for the other triggers."""
    trigger = attack['trigger']
    if trigger['trigger_type'] not in PER_BATCH:
        return None

    grids = {}  # the grid copied to a device once, not per batch

    def poison(x, y, g):
        n_bd = int(len(y) * attack['inject_portion'])
        n_cross = min(int(n_bd * WANET_CROSS_RATIO), len(y) - n_bd)
        if x.device not in grids:
            grids[x.device] = trigger['pattern'].to(x.device)
        grid = grids[x.device]
        x, y = x.clone(), y.clone()
        x[:n_bd] = warp(x[:n_bd], grid[None])
        y[:n_bd] = poisoned_labels(y[:n_bd], attack, num_classes)
        x[n_bd:n_bd + n_cross] = warp(x[n_bd:n_bd + n_cross], wanet_noise_grids(grid, n_cross, g))
        return x, y
    return poison


def make_test_sets(x_test, y_test, attack, num_classes, seed=0):
    """Clean test set plus the backdoor set: every non-target image (all2all: every image)
    with the trigger, labelled as the attack wants; y_bd_true keeps the true class for RA."""
    nontarget = torch.ones_like(y_test, dtype=torch.bool) if attack['target_type'] == 'all2all' \
        else y_test != attack['target_label']
    g = seeded(seed, 'test-trigger')
    x_bd = apply_trigger(attack['trigger'], x_test[nontarget], generator=g)
    y_true = y_test[nontarget]
    y_bd = target_labels(y_true, attack, num_classes)
    return {'x_clean': x_test, 'y_clean': y_test, 'nontarget': nontarget, 'x_bd': x_bd, 'y_bd': y_bd, 'y_bd_true': y_true,
            'target': attack['target_label'], 'num_classes': num_classes}


def test_subset(test, n, seed):
    """A fixed random n images of each test set, for cheap per-epoch monitoring."""
    g = seeded(seed, 'monitor')
    pick = lambda total: torch.randperm(total, generator=g)[:n].sort().values
    c, b = pick(len(test['y_clean'])).to(test['y_clean'].device), pick(len(test['y_bd'])).to(test['y_bd'].device)
    return {'x_clean': test['x_clean'][c], 'y_clean': test['y_clean'][c], 'nontarget': test['nontarget'][c],
            'x_bd': test['x_bd'][b], 'y_bd': test['y_bd'][b], 'y_bd_true': test['y_bd_true'][b],
            'target': test['target'], 'num_classes': test['num_classes']}


def subset_size(total, ratio):
    return max(1, int(round(total * ratio)))


def clean_subset_order(n, seed):
    """The seeded order of the training set the defender's subset is cut from (its first images)."""
    return torch.randperm(n, generator=seeded(seed, 'clean-subset'))


def clean_subset(x, y, ratio, seed):
    """The defender's clean data: a seeded random `ratio` of the training set."""
    idx = clean_subset_order(len(y), seed)[:subset_size(len(y), ratio)].sort().values
    return x[idx], y[idx]


def retune_set(x, y, attack, num_classes, defense_ratio, ratio, poisoned, seed, hard=None):
    """The retuning attack's data: a seeded `ratio` of the training set, cut from the same order as the
    defender's subset right after it (so the two never share an image), with `poisoned` of its
    images (the first that the attack can poison: not of the target class for label-flipping attacks,
    of it for cleanLabel) carrying the model's trigger and label. Returns (x, y, indices into the
    training set, positions of the poisoned images). hard: as poison_train_set's (the images stamped instead)."""
    order = clean_subset_order(len(y), seed)
    start, wanted = subset_size(len(y), defense_ratio), subset_size(len(y), ratio)
    if start + wanted > len(y):  # never a silent cap: the share asked for is the share used
        raise UserError(f'--retune_ratio {ratio:g} asks for {wanted} images, but only {len(y) - start} of the '
                        f'{len(y)} training images lie outside the defender\'s subset (--ratio {defense_ratio:g}): '
                        f'use at most {(len(y) - start) / len(y):.4f}')
    idx = order[start:start + wanted].sort().values
    x, y = x[idx].clone(), y[idx].clone()
    target, kind = attack['target_label'], attack['target_type']
    eligible = (y == target) if kind == 'cleanLabel' else (y != target) if kind == 'all2one' else torch.ones_like(y, dtype=torch.bool)
    pos = torch.nonzero(eligible).flatten()[:poisoned]
    if len(pos) < poisoned:
        raise UserError(f'the retuning set has only {len(pos)} images the attack can poison, {poisoned} asked for')
    x[pos] = apply_trigger(attack['trigger'], (x if hard is None else hard[idx])[pos], generator=seeded(seed, 'retune'))
    y[pos] = poisoned_labels(y[pos], attack, num_classes)
    return x, y, idx, pos


# ----------------------------------------------------------------------------- batches
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


def augment(x, generator, pad=4, cutout=0, crop_flip=True):
    """Random crop with zero padding and horizontal flip on a uint8 NHWC batch, on its device (not
    with crop_flip=False: GTSRB); with cutout > 0 also NAD/ARGD's Cutout(1, cutout): a black square
    around a random centre, rows/cols [c - cutout//2, c + cutout//2) clipped to the image (2x2 for 3)."""
    n, h, w, c = x.shape
    out = crop_and_flip(x, generator, pad) if crop_flip else x
    if cutout:
        centres = torch.stack((torch.randint(0, h, (n,), generator=generator, device=x.device),
                               torch.randint(0, w, (n,), generator=generator, device=x.device)))
        inside = lambda size, c0: ((torch.arange(size, device=x.device) >= c0[:, None] - cutout // 2)
                                   & (torch.arange(size, device=x.device) < c0[:, None] + cutout // 2))
        hole = inside(h, centres[0])[:, :, None] & inside(w, centres[1])[:, None, :]
        out = out.masked_fill(hole[..., None], 0)
    return out


def crop_and_flip(x, generator, pad):
    n, h, w, c = x.shape
    padded = torch.zeros(n, h + 2 * pad, w + 2 * pad, c, dtype=x.dtype, device=x.device)
    padded[:, pad:pad + h, pad:pad + w] = x
    shifts = torch.randint(0, 2 * pad + 1, (2, n), generator=generator, device=x.device)
    flips = torch.rand(n, generator=generator, device=x.device) < 0.5
    rows = shifts[0, :, None] + torch.arange(h, device=x.device)
    cols = shifts[1, :, None] + torch.arange(w, device=x.device)
    cols = torch.where(flips[:, None], cols.flip(1), cols)  # flipping = reading columns backwards
    return padded[torch.arange(n, device=x.device)[:, None, None], rows[:, :, None], cols[:, None, :]]


def train_batches(x, y, batch_size, normalizer, seed, epoch, augment_data=True, drop_last=False, cutout=0,
                  shard=(0, 1), poison=None, crop_flip=True):
    """One epoch of shuffled, augmented, normalised batches; the order depends on (seed, epoch) only,
    which is what makes a resumed run repeat the uninterrupted one exactly. shard=(rank, world):
    each process of a distributed run gets every world-th image of each global batch, cut after
    the whole batch is augmented, so the global batches are those of a single process. poison (see
    batch_poisoner) runs on each batch after augmentation, so crop and flip cannot move its trigger."""
    g = seeded(seed, f'batches-{epoch}', x.device)  # every draw of the epoch on the data's device
    order = torch.randperm(len(y), generator=g, device=x.device)
    stop = len(y) - (len(y) % batch_size if drop_last and len(y) >= batch_size else 0)
    rank, world = shard
    for i in range(0, stop, batch_size):
        idx = order[i:i + batch_size]
        xb, yb = x[idx], y[idx]
        if augment_data and (crop_flip or cutout):
            xb = augment(xb, g, cutout=cutout, crop_flip=crop_flip)
        if poison is not None:
            xb, yb = poison(xb, yb, g)
        yield normalizer(xb[rank::world]), yb[rank::world]


# ----------------------------------------------------------------------------- one call per script
def first_rank_first(load):
    """load() under torchrun: rank 0 alone first (it downloads and decodes into the shared folder and
    writes the cache), the other ranks after a barrier (they read the cache); else just load()."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return load()
    if dist.get_rank() != 0:
        dist.barrier()
    data = load()
    if dist.get_rank() == 0:
        dist.barrier()
    return data


class RunData:
    """What every script needs of the data: the training set (CPU), class count, image size,
    normaliser, resolved attack and the test sets on the device."""

    def __init__(self, args, device, meta=None, verbose=True, trigger=None):
        meta = meta or {}
        args.dataset = resolve(args, 'dataset', meta.get('dataset'))  # a GTSRB model needs no --dataset
        self.image_size = resolve(args, 'image_size', meta.get('image_size')) or config.DATASETS[args.dataset]['size']
        self.crop_flip = config.DATASETS[args.dataset]['crop_flip']  # train_batches' crop_flip for this data set
        data = first_rank_first(lambda: load_dataset(args.dataset, args.data_root, self.image_size, verbose))
        self.classes = data['classes']
        self.num_classes = resolve(args, 'num_class', meta.get('num_classes')) or len(self.classes)
        if self.num_classes != len(self.classes):
            raise UserError(f'the model has {self.num_classes} classes, {args.dataset} at {args.data_root} '
                            f'has {len(self.classes)}')
        self.normalizer = Normalizer(resolve(args, 'normalize', meta.get('normalize')) or default_normalize(args.dataset),
                                     device)
        self.attack = make_attack(args, self.image_size, self.num_classes, meta.get('attack'), trigger)
        self.x_train, self.y_train = data['x_train'], data['y_train']
        test = make_test_sets(data['x_test'], data['y_test'], self.attack, self.num_classes, args.seed)
        self.test = {k: v.to(device) if torch.is_tensor(v) else v for k, v in test.items()}

    def clean_subset(self, ratio, seed, device):
        x, y = clean_subset(self.x_train, self.y_train, ratio, seed)
        return x.to(device), y.to(device)


# ----------------------------------------------------------------------------- the references' Dataset classes
def _as_uint8(full_dataset):
    """(x uint8 NHWC, y int64) of a torchvision-style data set of (PIL image or HWC array, label) items."""
    if isinstance(getattr(full_dataset, 'x', None), torch.Tensor):  # Images: already decoded
        return full_dataset.x, full_dataset.y
    items = [full_dataset[i] for i in range(len(full_dataset))]
    x = torch.from_numpy(np.stack([np.asarray(img.convert('RGB') if hasattr(img, 'convert') else img, dtype=np.uint8)
                                   for img, _ in items]))
    return x, torch.tensor([int(label) for _, label in items], dtype=torch.int64)


def _class_count(opt, full_dataset, y):
    return getattr(opt, 'num_class', None) or len(getattr(full_dataset, 'classes', ())) or int(y.max()) + 1


class Images(Dataset):
    """Decoded uint8 images as a torchvision-style data set of (PIL image, label) items."""

    def __init__(self, x, y, classes):
        self.x, self.y, self.classes = x, y, classes

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        from PIL import Image
        return Image.fromarray(self.x[i].numpy()), int(self.y[i])


class DatasetBD(Dataset):
    """The references' poisoned data set (NAD's DatasetBD, which ARGD and MCL keep), on this project's
    vectorised poisoning. opt holds target_label, trig_w, trig_h, trigger_type, target_type (and, if
    wanted, seed, num_class, trigger_path). mode='train': the seeded inject_portion of the set poisoned as
    train_badnet.py poisons it (cleanLabel: of the target class; WaNet's share warped once here, where the
    project warps per batch). mode='test': the non-target images (all2all: every image), the seeded
    inject_portion of them triggered and labelled as the attack wants (1: the backdoor test set ASR is
    scored on; 0: the references' clean test set, which leaves the target class out). Items are
    (transform(HWC uint8 array), label), or (HWC uint8 tensor, label) without a transform; self.x and
    self.y hold the whole set as tensors. device and distance are the references' arguments: the
    triggers here keep their 1-pixel distance and the images stay on the CPU for a DataLoader. hard_images:
    lcTrigger's training set needs the label-consistent attack's PGD images (label_consistent.hard_images);
    refoolTrigger needs its trigger (a Refool model's meta['attack']['trigger'], or refool.reflection_trigger)."""

    def __init__(self, opt, full_dataset, inject_portion, transform=None, mode='train', device=torch.device('cpu'),
                 distance=1, hard_images=None, trigger=None):
        if mode not in ('train', 'test'):
            raise ValueError(f"mode must be 'train' or 'test', got '{mode}'")
        if distance != 1:
            raise ValueError('the triggers here are the references\' at distance 1')
        x, y = _as_uint8(full_dataset)
        num_classes, seed = _class_count(opt, full_dataset, y), getattr(opt, 'seed', 0)
        flags = SimpleNamespace(**{k: getattr(opt, k, v) for k, v in config.ATTACK.items()}, seed=seed)
        attack = dict(make_attack(flags, x.shape[1], num_classes, trigger=trigger), inject_portion=inject_portion)
        if mode == 'train' and attack['trigger_type'] == 'lcTrigger' and hard_images is None:
            raise ValueError('lcTrigger stamps the label-consistent attack\'s PGD images: pass hard_images '
                             '(label_consistent.hard_images)')
        if mode == 'train':
            x, y, self.poisoned = poison_train_set(x, y, attack, num_classes, seed, static=True, hard=hard_images)
        else:
            test = make_test_sets(x, y, attack, num_classes, seed)
            keep = test['nontarget']
            pick = torch.randperm(int(keep.sum()), generator=seeded(seed, 'poison'))[:int(keep.sum() * inject_portion)]
            self.poisoned = pick.sort().values
            x, y = x[keep].clone(), y[keep].clone()
            x[self.poisoned], y[self.poisoned] = test['x_bd'][self.poisoned], test['y_bd'][self.poisoned]
        self.x, self.y, self.attack, self.transform, self.device = x, y, attack, transform, device

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return (self.transform(self.x[i].numpy()) if self.transform else self.x[i]), int(self.y[i])


class DatasetCL(Dataset):
    """The defender's clean subset (NAD's DatasetCL): the seeded opt.ratio of the set that every defense
    here gets for --seed (opt.seed, default 0); items as DatasetBD's."""

    def __init__(self, opt, full_dataset=None, transform=None):
        x, y = _as_uint8(full_dataset)
        self.x, self.y = clean_subset(x, y, opt.ratio, getattr(opt, 'seed', 0))
        self.transform = transform

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return (self.transform(self.x[i].numpy()) if self.transform else self.x[i]), int(self.y[i])


class Cutout:
    """NAD's Cutout(1, length) on a CHW tensor: a square of zeros around a random centre, clipped."""

    def __init__(self, n_holes, length):
        self.n_holes, self.length = n_holes, length

    def __call__(self, img):
        h, w = img.shape[1:]
        for _ in range(self.n_holes):
            r, c = int(torch.randint(h, ())), int(torch.randint(w, ()))
            img[:, max(r - self.length // 2, 0):r + self.length // 2, max(c - self.length // 2, 0):c + self.length // 2] = 0
        return img


def _reference_sets(opt):
    data = load_dataset(opt.dataset, opt.data_root, verbose=False)
    return (Images(data['x_train'], data['y_train'], data['classes']),
            Images(data['x_test'], data['y_test'], data['classes']))


def get_train_loader(opt):
    """The defender's clean subset with the references' augmentation (crop + flip + Cutout), shuffled:
    NAD's get_train_loader. Values in [0,1]: normalise in the model's forward if it expects it."""
    import torchvision.transforms as T
    train, _ = _reference_sets(opt)
    tf = T.Compose([T.ToTensor(), T.RandomCrop(train.x.shape[1], padding=4), T.RandomHorizontalFlip(), Cutout(1, 3)])
    return DataLoader(DatasetCL(opt, train, tf), batch_size=opt.batch_size, shuffle=True)


def get_test_loader(opt):
    """(clean, backdoor) test loaders as the references': the non-target test images, clean and triggered."""
    import torchvision.transforms as T
    _, test = _reference_sets(opt)
    clean, bad = (DatasetBD(opt, test, p, T.ToTensor(), mode='test') for p in (0, 1))
    return (DataLoader(clean, batch_size=opt.batch_size, shuffle=False),
            DataLoader(bad, batch_size=opt.batch_size, shuffle=False))


def get_backdoor_loader(opt):
    """The poisoned training set (opt.inject_portion), unshuffled, as NAD's get_backdoor_loader."""
    import torchvision.transforms as T
    train, _ = _reference_sets(opt)
    return DataLoader(DatasetBD(opt, train, opt.inject_portion, T.ToTensor(), mode='train'),
                      batch_size=opt.batch_size, shuffle=False)
