"""The adversarial share of a batch: a share of its images replaced, at their true labels, by untargeted
PGD images or by the images with a synthesised trigger stamped (FT-AT, FT-SI, PAM, ARGD-SI). Images are
in [0,1]; `norm` turns them into the model's input; perturbations are in [0,1]-pixel units, as the
references' L_inf bound 0.2 is.
"""
import torch
import torch.nn.functional as F

from models import eval_mode


def pgd_untargeted(model, x01, y, norm, eps, step, steps, generator):
    """Untargeted L_inf PGD from a random start: images in [0,1] within eps of x01 that raise the
    cross-entropy of their true labels y. The model's parameters and mode are left as they were."""
    delta = (torch.rand(x01.shape, generator=generator, device=x01.device) * 2 - 1) * eps
    delta = ((x01 + delta).clamp(0, 1) - x01).requires_grad_(True)
    with eval_mode(model):
        for _ in range(steps):
            loss = F.cross_entropy(model(norm(x01 + delta)).float(), y)
            grad, = torch.autograd.grad(loss, delta)
            with torch.no_grad():
                delta += step * grad.sign()
                delta.clamp_(-eps, eps)
                delta.copy_((x01 + delta).clamp(0, 1) - x01)
    return (x01 + delta).detach()


def share_count(share, batch):
    """How many images of a batch a share replaces: at least one while the share is above 0."""
    return max(1, int(round(share * batch))) if share > 0 else 0


def with_adversarial_share(model, x01, y, norm, share, eps, step, steps, generator):
    """The batch with its first `share` (at least one image) replaced by untargeted PGD images, labels
    kept: the batch order is already random, so the first rows are a random choice."""
    n = share_count(share, len(y))
    if n == 0:
        return x01
    x01 = x01.clone()
    x01[:n] = pgd_untargeted(model, x01[:n], y[:n], norm, eps, step, steps, generator)
    return x01


def with_pattern_share(x01, pattern, share):
    """The batch with its first `share` (at least one image) carrying an additive pattern (a synthesised
    trigger, [0,1]-pixel units), labels kept."""
    n = share_count(share, len(x01))
    x01 = x01.clone()
    x01[:n] = (x01[:n] + pattern).clamp(0, 1)
    return x01
