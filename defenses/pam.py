"""PAM, path-aware minimisation (Min et al., NeurIPS 2024): FT-AT's batches, with the cross-entropy gradient
taken at theta + rho * (theta_bd - theta) / |theta_bd - theta|, a point moved back towards the backdoored
weights, and applied at theta (main_ft.py, the default). The paper synthesises its images with BTI-DBF's
generator; here they are FT-AT's PGD images (results/README.md says why and what it costs).
"""
import contextlib

import torch

from defenses import ft_at

KEYS = {'pam': dict(label='PAM')}
FINDINGS = ft_at.FINDINGS


def tag(args):
    return 'pam-si' if args.source == 'inverted' else 'pam'


def options(add):
    ft_at.options(add)
    add('--rho', type=float, minimum=0, help='PAM: distance in weight space from the weights towards the backdoored '
        'ones where the gradient is taken (0: plain gradient)')


def build(ctx):
    steps = ft_at.share_steps(ctx.args, ctx)
    steps.gradient_point = path_aware(ctx.model, ctx.args.rho)
    return steps


@contextlib.contextmanager
def path_aware_point(params, params_bd, rho):
    """Inside the block the parameters sit at theta + rho * (theta_bd - theta) / |theta_bd - theta|
    (the whole parameter vector's L2 norm), so a backward pass there gives PAM's gradient; on leaving,
    the exact theta is put back (copied, not subtracted: no rounding drift) before the optimiser
    steps. At theta = theta_bd the direction is zero and the point is theta itself."""
    with torch.no_grad():
        saved = [p.detach().clone() for p in params]
        diffs = [b - p for p, b in zip(params, params_bd)]
        dist = torch.sqrt(sum(d.float().pow(2).sum() for d in diffs))
        scale = rho / (dist + 1e-12)
        for p, d in zip(params, diffs):
            p.add_(d * scale.to(d.dtype))
    try:
        yield
    finally:
        with torch.no_grad():
            for p, s in zip(params, saved):
                p.copy_(s)


def path_aware(model, rho):
    """PAM's gradient point for fit(): a function giving the context that moves the model's parameters rho
    towards their values now (the backdoored weights, as the defense starts); None where rho is 0."""
    if not rho:
        return None
    params = list(model.parameters())
    params_bd = [p.detach().clone() for p in params]
    norm = parameter_norm(params_bd)
    print(f'path-aware gradient: rho {rho:g} in a parameter space of norm {norm:.2f} ({rho / norm:.4f} of it)')
    return lambda: path_aware_point(params, params_bd, rho)


def parameter_norm(params):
    return float(torch.sqrt(sum(p.detach().float().pow(2).sum() for p in params)))
