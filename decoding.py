"""Decoding: a data set (torchvision's CIFAR-10/100 and GTSRB, or an image-folder tree) decoded once to uint8
tensors x (N, H, W, C) and y (N,) and cached next to the data (or in ~/.cache/backdoor-erasing when that is
read-only), so later runs start in seconds."""
import hashlib
import os

import numpy as np
import torch

import config
from errors import UserError
from files import atomic_save

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
