"""Poisoning: the attack resolved (flags, meta, config.ATTACK), the training set poisoned in one vectorised pass
(or per batch where the trigger needs it: WaNet), the test sets, the retuning attack's set."""
import torch

import config
from checkpoints import resolve
from errors import UserError
from subsets import clean_subset_order, seeded, subset_size
from triggers import PER_BATCH, WANET_CROSS_RATIO, TriggerError, apply_trigger, make_trigger, wanet_noise_grids, warp


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
