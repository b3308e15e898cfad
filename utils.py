"""Learning-rate schedules (what the references keep in their utils.py as adjust_learning_rate)."""
import math


def step_lr(base, epoch, milestones, factors):
    """Step schedule: base * factors[i], where i = how many milestones epoch (0-based) has reached."""
    return base * factors[sum(epoch >= m for m in milestones)]


def cosine_lr(base, epoch, epochs):
    """CosineAnnealingLR stepped once per epoch: base at epoch 0, towards 0 at the end."""
    return base * (1 + math.cos(math.pi * epoch / epochs)) / 2


def schedule(recipe, lr, epochs):
    """lr_at(epoch) of a recipe (a config.DEFENSES entry): 'step' (its milestones and factors), 'cosine'
    over `epochs`, or 'constant'."""
    if recipe['schedule'] == 'step':
        return lambda epoch: step_lr(lr, epoch, recipe['milestones'], recipe['factors'])
    if recipe['schedule'] == 'cosine':
        return lambda epoch: cosine_lr(lr, epoch, epochs)
    return lambda epoch: lr
