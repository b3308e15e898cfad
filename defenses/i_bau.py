"""I-BAU, implicit backdoor adversarial unlearning (Zeng et al., ICLR 2022; YiZeng623/I-BAU): a minimax on the
defender's clean subset. Each round (epoch) first finds one universal perturbation that most raises the loss of
the model's own predictions (the inner maximisation, SGD over the subset), then updates the model on every
batch, a share of it carrying that perturbation, through the implicit hypergradient: the gradient of the outer
loss plus the inner problem's response to the weights, from K fixed-point iterations (main_ft.py --defense i-bau).

As the reference: BatchNorm in eval mode (its model.eval() before unlearning), images perturbed unclipped, the
perturbation on int(1% of a batch) images, Adam on the weights. One difference: the reference's inner loss in
the hypergradient reads the set's first batch at every step; here each batch's own images.
"""
import torch
import torch.nn.functional as F

from defenses.ft_at import fine_tuning_options, raw_batches
from device import autocast
from training import Steps

KEYS = {'i-bau': dict(label='I-BAU')}


def options(add):
    fine_tuning_options(add)
    add('--ibau_k', type=int, minimum=1, help='I-BAU: fixed-point iterations of the hypergradient (K)')
    add('--ibau_inner_lr', type=float, minimum=0, help="I-BAU: SGD lr of the universal perturbation's search")
    add('--ibau_fp_step', type=float, minimum=0, help="I-BAU: step of the inner problem's fixed-point map")
    add('--ibau_reg', type=float, minimum=0, help='I-BAU: weight of |delta|^2 in the inner loss')
    add('--ibau_share', type=float, minimum=0, help='I-BAU: share of a batch carrying the perturbation in the outer loss')


def implicit_surrogate(outer, inner, delta, step, k):
    """A scalar whose value is outer(delta) and whose gradient in `params` is the implicit hypergradient of
    outer(delta*(theta), theta) in the parameters theta both depend on, delta* the fixed point of phi(delta) = delta - step * d inner / d delta:
    d outer / d theta + (d phi / d theta)^T v, v = sum_{i<k} (d phi / d delta)^{T i} d outer / d delta (the
    fixed-point method's k iterations: v <- (d phi / d delta)^T v + d outer / d delta). outer and inner are
    functions of delta; delta is a leaf with requires_grad."""
    value = outer(delta)
    grad_outer, = torch.autograd.grad(value, delta, retain_graph=True)
    grad_inner, = torch.autograd.grad(inner(delta), delta, create_graph=True)
    phi = delta - step * grad_inner
    v = torch.zeros_like(delta)
    for _ in range(k):
        v = torch.autograd.grad(phi, delta, grad_outputs=v, retain_graph=True)[0] + grad_outer
    response = (v.detach() * phi).sum()  # its gradient in theta: (d phi / d theta)^T v
    return value + response - response.detach()


def universal_perturbation(model, batches, norm, shape, lr, reg, device, amp):
    """I-BAU's inner maximisation: one perturbation for every image, SGD steps (one per batch) raising the
    cross-entropy of the model's own predictions on the perturbed images, minus reg * |delta|^2. Only delta
    gets a gradient; the model is left as it was."""
    delta = torch.zeros(shape, device=device, requires_grad=True)
    opt = torch.optim.SGD([delta], lr=lr)
    for x01, _ in batches:
        with torch.no_grad(), autocast(device, amp):
            own = model(norm(x01)).argmax(1)
        with autocast(device, amp):
            ce = F.cross_entropy(model(norm(x01 + delta)).float(), own)
        grad, = torch.autograd.grad(-ce + reg * delta.pow(2).sum(), delta)
        delta.grad = grad
        opt.step()
    return delta.detach()


def build(ctx):
    args, run = ctx.args, ctx
    model, norm = run.model, run.data.normalizer.normalize_float
    batches, state = raw_batches(args, run), {}
    shape = (1, 3, run.x.shape[1], run.x.shape[2])

    def epoch_batches(epoch):  # a round: the perturbation against the model as it starts the round, then its batches
        state['delta'] = universal_perturbation(model, batches(epoch), norm, shape, args.ibau_inner_lr,
                                                args.ibau_reg, run.device, args.amp)
        print(f"I-BAU round {epoch + 1}: universal perturbation L2 {float(state['delta'].norm()):.2f}", flush=True)
        yield from batches(epoch)

    def loss(x01, y):
        n = int(len(y) * args.ibau_share)  # the reference: int(batch * 1%) images carry the perturbation
        patch = torch.zeros_like(x01)
        patch[:n] = 1.0  # the batch order is random: its first images are a random choice

        def outer(delta):
            return F.cross_entropy(model(norm(x01 + patch * delta)).float(), y)

        def inner(delta):
            return -F.cross_entropy(model(norm(x01 + delta)).float(), y) + args.ibau_reg * delta.pow(2).sum()
        delta = state['delta'].clone().requires_grad_(True)
        return implicit_surrogate(outer, inner, delta, args.ibau_fp_step, args.ibau_k)
    return Steps(batches=epoch_batches, loss=loss, train_mode=False)
