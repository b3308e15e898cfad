"""ANP, adversarial neuron pruning (Wu & Wang, NeurIPS 2021; csdongxian/ANP_backdoor): every BatchNorm neuron
gets a mask m in [0, 1], learned on the defender's clean subset while its weight and bias are perturbed
adversarially (weight x (m + delta), bias x (1 + xi), delta and xi from a uniform start in [-eps, eps] moved by
signed steps that raise the loss); the loss alpha CE(clean) + (1 - alpha) CE(perturbed). Then the neurons whose
mask is at most the threshold are pruned (their BatchNorm weight set to 0, as prune_neuron_cifar.py) in the model
as given (main_ft.py --defense anp). The mask is learned through the one training loop: the model's weights frozen,
the masks its only trained parameters, BatchNorm on batch statistics as the reference's model.train(); its running
statistics are put back before pruning (the reference prunes the checkpoint it loaded).

Numbers: config.DEFENSES['anp'] (optimize_mask_cifar.py's). Where this departs from it: the reference draws its
batches with replacement, here each pass is a shuffle of the subset (full batches only, as the reference's).
"""
import torch
import torch.nn.functional as F

from defenses import clean_batches
from defenses.ft_at import fine_tuning_options
from subsets import seeded
from training import Steps
from utils import schedule

KEYS = {'anp': dict(label='ANP')}
FINDINGS = ('anp_pruned',)  # neurons pruned


def options(add):
    fine_tuning_options(add)  # --epochs: passes over the subset; --lr: the masks' SGD lr
    add('--anp_eps', type=float, minimum=0, help='ANP: bound of the neuron perturbations (relative to weight and bias)')
    add('--anp_steps', type=int, minimum=1, help='ANP: signed steps of the perturbation per batch (each eps / steps)')
    add('--anp_alpha', type=float, minimum=0, help='ANP: weight of the clean loss (1 - alpha: the perturbed one)')
    add('--anp_threshold', type=float, minimum=0, help='ANP: prune the neurons whose mask is at most this')


class MaskedNorm(torch.nn.Module):
    """A BatchNorm2d under ANP: weight x (mask [+ noise]), bias [x (1 + noise_bias)]; noise applied while
    `perturbed`."""

    def __init__(self, bn):
        super().__init__()
        self.bn = bn
        self.neuron_mask = torch.nn.Parameter(torch.ones_like(bn.weight))
        self.noise = self.noise_bias = None
        self.perturbed = False

    def forward(self, x):
        bn = self.bn
        weight, bias = bn.weight * self.neuron_mask, bn.bias
        if self.perturbed:
            weight, bias = bn.weight * (self.neuron_mask + self.noise), bn.bias * (1 + self.noise_bias)
        return F.batch_norm(x, bn.running_mean, bn.running_var, weight, bias, self.training, bn.momentum, bn.eps)


def wrap(model):
    """Replace every BatchNorm2d by its MaskedNorm; returns {qualified name: MaskedNorm}."""
    out = {}
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, torch.nn.BatchNorm2d):
                masked = MaskedNorm(child)
                setattr(module, child_name, masked)
                out[f'{name}.{child_name}' if name else child_name] = masked
    return out


def unwrap(model):
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, MaskedNorm):
                setattr(module, child_name, child.bn)


def prune_by_masks(model, masks, state, threshold, label):
    """Unwrap the masked norms, load `state` (the model's own tensors it needs back) and zero the BatchNorm weight
    of every neuron whose mask is at most threshold (prune_neuron_cifar.py's pruning); returns how many."""
    values = {name: m.neuron_mask.detach().clone() for name, m in masks.items()}
    unwrap(model)
    pruned = 0
    with torch.no_grad():
        own = model.state_dict()
        for k, v in state.items():
            own[k].copy_(v)
        for name, mask in values.items():
            low = mask <= threshold
            own[f'{name}.weight'][low] = 0
            pruned += int(low.sum())
    model.requires_grad_(True)
    print(f'{label}: {pruned} of {sum(len(v) for v in values.values())} neurons pruned (mask <= {threshold:g})')
    return pruned


def anp_loss(model, masks, eps, steps, alpha, generator):
    """The reference's mask_train step as a loss: the neurons' perturbation from a uniform start, `steps` signed
    steps of eps / steps raising the cross-entropy (no clipping, as the reference), then alpha CE(masked) +
    (1 - alpha) CE(masked and perturbed)."""
    def set_perturbed(flag):
        for m in masks:
            m.perturbed = flag

    def loss(x, y):
        robust = 0.0
        if eps > 0:
            noises = []
            for m in masks:
                u = lambda: (torch.rand(m.bn.weight.shape, generator=generator(), device=x.device) * 2 - 1) * eps
                m.noise, m.noise_bias = u().requires_grad_(True), u().requires_grad_(True)
                noises += [m.noise, m.noise_bias]
            set_perturbed(True)
            for _ in range(steps):
                grads = torch.autograd.grad(-F.cross_entropy(model(x).float(), y), noises)
                noises = [(n - eps / steps * g.sign()).detach().requires_grad_(True) for n, g in zip(noises, grads)]
                for i, m in enumerate(masks):
                    m.noise, m.noise_bias = noises[2 * i], noises[2 * i + 1]
            for m in masks:
                m.noise, m.noise_bias = m.noise.detach(), m.noise_bias.detach()
            robust = F.cross_entropy(model(x), y)
            set_perturbed(False)
        return alpha * F.cross_entropy(model(x), y) + (1 - alpha) * robust
    return loss


def build(ctx):
    args, run = ctx.args, ctx
    model = run.model
    saved_stats = {k: v.clone() for k, v in model.state_dict().items() if 'running_' in k or 'num_batches' in k}
    model.requires_grad_(False)
    masks = wrap(model)
    stream = {}
    loss = anp_loss(model, list(masks.values()), args.anp_eps, args.anp_steps, args.anp_alpha, lambda: stream['g'])
    clean = clean_batches(args, run)

    def batches(epoch):
        stream['g'] = seeded(args.seed, f'anp-{epoch}', run.device)  # per epoch: a resumed run repeats it
        return clean(epoch)

    def clip():
        with torch.no_grad():
            for m in masks.values():
                m.neuron_mask.clamp_(0, 1)
    meta = {}

    def finish():  # prune the model as given: running statistics put back, low-mask neurons' weights zeroed
        meta['anp_pruned'] = prune_by_masks(model, masks, saved_stats, args.anp_threshold, 'ANP')
    return Steps(batches=batches, loss=loss, after_step=clip, finish=finish, meta=meta,
                 lr_at=schedule(args.schedule, args.lr, args.epochs, args.milestones, args.factors))
