"""Data: what every script needs of it (RunData), and the references' face over the modules that do the work:
decoding.py (decode once to uint8 tensors), poisoning.py (poison in one vectorised pass), subsets.py and
batching.py (batches on the device).

A data set lives as x (N, H, W, C) uint8 and y (N,) int64. Images are decoded once and
cached next to the data (or in ~/.cache/backdoor-erasing when that is read-only), so later
runs start in seconds. Training batches are cut from tensors already on the device, with
random crop (pad 4), horizontal flip and normalisation done on the whole batch.

For a training loop of one's own: the references' DatasetBD (the poisoned set), DatasetCL (the
defender's clean subset) and get_train_loader / get_test_loader / get_backdoor_loader, built on the
same vectorised poisoning, pixel for pixel what the project's scripts train and score on.
"""
from types import SimpleNamespace

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

import config
from batching import Normalizer, default_normalize
from checkpoints import resolve
from decoding import load_dataset
from errors import UserError
from poisoning import make_attack, make_test_sets, poison_train_set
from subsets import clean_subset, seeded

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
