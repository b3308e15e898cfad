"""Fine-tuning defenses that aim past superficial safety (Min et al., NeurIPS 2023 and 2024; Wei et al.,
NeurIPS 2023), and the blind adversarial baseline they must beat. All of them see only the defender's
clean subset; none is told the trigger or the target.

- FT-AT: fine-tuning where a share of each batch is replaced by untargeted PGD images at their true
  labels (the blind baseline).
- PAM (path-aware minimisation): the same batches, with the cross-entropy gradient taken at
  theta + rho * (theta_bd - theta) / |theta_bd - theta|, a point moved back towards the backdoored
  weights, and applied at theta. The paper synthesises its images with BTI-DBF's generator; here they
  are the PGD images of FT-AT (results/README.md says why and what it costs).
- FST (feature-shift tuning): a re-initialised linear head, cross-entropy plus alpha <W, W_orig>,
  and the head's norm put back to the original one after every step.
- SAU (shared adversarial unlearning): PGD perturbations that both the current model and the
  original one get wrong the same way, unlearned (their shared wrong label made unlikely), plus
  cross-entropy on the clean images.

Images enter in [0,1]; `norm` turns them into the model's input. Perturbations live in [0,1]-pixel
units, as the references' L_inf bound 0.2 does.
"""
import contextlib
import math

import torch
import torch.nn.functional as F


# ----------------------------------------------------------------------------- PGD
def pgd_untargeted(model, x01, y, norm, eps, step, steps, generator):
    """Untargeted L_inf PGD from a random start: images in [0,1] within eps of x01 that raise the
    cross-entropy of their true labels y. The model's parameters and mode are left as they were."""
    was_training = model.training
    model.eval()
    delta = (torch.rand(x01.shape, generator=generator, device=x01.device) * 2 - 1) * eps
    delta = ((x01 + delta).clamp(0, 1) - x01).requires_grad_(True)
    for _ in range(steps):
        loss = F.cross_entropy(model(norm(x01 + delta)).float(), y)
        grad, = torch.autograd.grad(loss, delta)
        with torch.no_grad():
            delta += step * grad.sign()
            delta.clamp_(-eps, eps)
            delta.copy_((x01 + delta).clamp(0, 1) - x01)
    model.train(was_training)
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


# ----------------------------------------------------------------------------- PAM
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


# ----------------------------------------------------------------------------- FST
def reinit_head(head, generator):
    """FST's re-initialised linear classifier: weight and bias uniform in +-1/sqrt(fan_in)."""
    bound = 1 / math.sqrt(head.weight.shape[1])
    with torch.no_grad():
        for p in (head.weight, head.bias):
            p.copy_((torch.rand(p.shape, generator=generator) * 2 - 1).to(p.device) * bound)


def fst_penalty(weight, weight_orig, alpha):
    """alpha * <W, W_orig>: minimising it turns the new head away from the backdoored one."""
    return alpha * (weight.float() * weight_orig.float()).sum()


@torch.no_grad()
def keep_norm(weight, norm):
    """Rescale the head's weight back to the original head's Frobenius norm (after every step)."""
    weight.mul_(norm / weight.float().norm().clamp(min=1e-12))


# ----------------------------------------------------------------------------- SAU
def shared_mask(pred, pred_ref, clean_pred, clean_pred_ref):
    """SAU's shared adversarial examples: the perturbation moves both models off their clean
    prediction, to the same label."""
    return (pred != clean_pred) & (pred_ref != clean_pred_ref) & (pred == pred_ref)


def js_divergence(logits_a, logits_b):
    """Per-sample Jensen-Shannon divergence between two softmax distributions."""
    p, q = F.softmax(logits_a.float(), 1).clamp(min=1e-8), F.softmax(logits_b.float(), 1).clamp(min=1e-8)
    m = 0.5 * (p + q)
    return 0.5 * ((p * (p.log() - m.log())).sum(1) + (q * (q.log() - m.log())).sum(1))


def shared_pgd(model, model_ref, x01, y, norm, eps, step, steps, beta_adv, beta_shared):
    """SAU's maximisation: from the L_inf corner +eps, signed steps that make both models leave the
    true label (beta_adv: cross-entropy of the images a model still gets right) and agree
    (beta_shared: JS divergence of the images not yet shared); stops once every image is shared. As the
    reference, the perturbation is not clipped to valid pixels. Both models are in eval mode; only
    the perturbation gets a gradient."""
    with torch.no_grad():
        clean_pred, clean_pred_ref = model(norm(x01)).argmax(1), model_ref(norm(x01)).argmax(1)
    delta = torch.full_like(x01, eps).requires_grad_(True)
    for _ in range(steps):
        out, out_ref = model(norm(x01 + delta)).float(), model_ref(norm(x01 + delta)).float()
        pred, pred_ref = out.argmax(1), out_ref.argmax(1)
        fooled, fooled_ref = pred != clean_pred, pred_ref != clean_pred_ref
        shared = shared_mask(pred, pred_ref, clean_pred, clean_pred_ref)
        ce, ce_ref = F.cross_entropy(out, y, reduction='none'), F.cross_entropy(out_ref, y, reduction='none')
        loss_adv = -((ce * ~fooled).sum() + (ce_ref * ~fooled_ref).sum()) / 2 / len(y)
        loss_shared = (js_divergence(out, out_ref) * ~shared).sum() / len(y)
        grad, = torch.autograd.grad(beta_adv * loss_adv + beta_shared * loss_shared, delta)
        with torch.no_grad():
            delta -= step * grad.sign()
            delta.clamp_(-eps, eps)
        if bool(shared.all()):
            break
    return (x01 + delta).detach()


def shared_unlearning_loss(logits_adv, pred_ref_adv, y, clean_pred_ref):
    """Unlearn the original model's adversarial label k where the perturbation fooled it: -log(1 - p_k)
    under the current model, summed over the fooled images with p_k >= 0.001 (the reference's clamp:
    lower ones are dropped) and divided by the batch size. Computed as logsumexp(all logits) -
    logsumexp(logits but k), which is exact where the reference's -log(1e-6 + (1 - p_k)) saturates: on a
    model whose adversarial logits lead by ~20 (a strong backdoor), p_k rounds to 1, the 1e-6 dominates
    and the gradient vanishes (measured: SAU then left a Blended backdoor at ASR 100)."""
    fooled_ref = (pred_ref_adv != y) & (pred_ref_adv != clean_pred_ref)
    logits = logits_adv.float()
    log_p = logits.log_softmax(1).gather(1, pred_ref_adv[:, None])[:, 0]
    keep = fooled_ref & (log_p >= math.log(1e-3))
    others = logits.masked_fill(F.one_hot(pred_ref_adv, logits.shape[1]).bool(), float('-inf'))
    log_not_k = others.logsumexp(1) - logits.logsumexp(1)   # log(1 - p_k), finite while any other logit is
    return -(log_not_k * keep).sum() / len(y)
