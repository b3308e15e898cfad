"""Learning-rate schedules (what the references keep in their utils.py as adjust_learning_rate)."""
import math


def step_lr(base, epoch, milestones, factors):
    """Step schedule: base * factors[i], where i = how many milestones epoch (0-based) has reached."""
    return base * factors[sum(epoch >= m for m in milestones)]


def cosine_lr(base, epoch, epochs):
    """CosineAnnealingLR stepped once per epoch: base at epoch 0, towards 0 at the end."""
    return base * (1 + math.cos(math.pi * epoch / epochs)) / 2


def curve_lr(base, epoch, epochs):
    """MCR's curve schedule (IBM/model-sanitization train.py): base for the first half, then linearly down
    to base / 100 at 90% of the epochs, base / 100 after; epoch 0-based, counted from 1 as the reference."""
    alpha = (epoch + 1) / epochs
    return base * (1.0 if alpha <= 0.5 else 1.0 - (alpha - 0.5) / 0.4 * 0.99 if alpha <= 0.9 else 0.01)


def schedule(name, lr, epochs, milestones=(), factors=(1,)):
    """lr_at(epoch) of a named schedule: 'step' (lr * factors[i] from the i-th of the milestones), 'cosine' over
    `epochs`, 'curve' (MCR's), or 'constant'."""
    if name == 'step':
        return lambda epoch: step_lr(lr, epoch, milestones, factors)
    if name == 'cosine':
        return lambda epoch: cosine_lr(lr, epoch, epochs)
    if name == 'curve':
        return lambda epoch: curve_lr(lr, epoch, epochs)
    return lambda epoch: lr
