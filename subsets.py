"""Seeded random streams, one per purpose, and the subsets cut with them: the defender's clean subset, the
per-epoch monitor's test subset."""
import zlib

import torch


def seeded(seed, stream, device='cpu'):
    """An independent generator per purpose: poisoned indices, the clean subset and the batch
    order must not share one random stream (they would pick the same images). On the device of the
    tensors it draws for (per-batch draws need no host copy; a CUDA stream's numbers are not the CPU's)."""
    return torch.Generator(device=device).manual_seed((seed * 1000003 + zlib.crc32(stream.encode())) % 2 ** 62)

def subset_size(total, ratio):
    return max(1, int(round(total * ratio)))

def clean_subset_order(n, seed):
    """The seeded order of the training set the defender's subset is cut from (its first images)."""
    return torch.randperm(n, generator=seeded(seed, 'clean-subset'))

def clean_subset(x, y, ratio, seed):
    """The defender's clean data: a seeded random `ratio` of the training set."""
    idx = clean_subset_order(len(y), seed)[:subset_size(len(y), ratio)].sort().values
    return x[idx], y[idx]

def test_subset(test, n, seed):
    """A fixed random n images of each test set, for cheap per-epoch monitoring."""
    g = seeded(seed, 'monitor')
    pick = lambda total: torch.randperm(total, generator=g)[:n].sort().values
    c, b = pick(len(test['y_clean'])).to(test['y_clean'].device), pick(len(test['y_bd'])).to(test['y_bd'].device)
    return {'x_clean': test['x_clean'][c], 'y_clean': test['y_clean'][c], 'nontarget': test['nontarget'][c],
            'x_bd': test['x_bd'][b], 'y_bd': test['y_bd'][b], 'y_bd_true': test['y_bd_true'][b],
            'target': test['target'], 'num_classes': test['num_classes']}
