"""SAU, shared adversarial unlearning (Wei et al., NeurIPS 2023): PGD perturbations that both the current
model and the original one get wrong the same way, unlearned (their shared wrong label made unlikely),
plus cross-entropy on the clean images; BatchNorm frozen, as the reference's default (main_ft.py
--defense sau).
"""
import copy
import math

import torch
import torch.nn.functional as F

from defenses.ft_at import fine_tuning_options, pgd_options, raw_batches
from training import Steps

KEYS = {'sau': dict(label='SAU')}


def options(add):
    fine_tuning_options(add)
    pgd_options(add)
    add('--sau_beta_adv', type=float, minimum=0, help='SAU: weight of the adversarial term of the shared PGD')
    add('--sau_beta_shared', type=float, minimum=0, help='SAU: weight of the agreement (JS) term of the shared PGD')
    add('--sau_lmd_shared', type=float, minimum=0, help='SAU: weight of the shared unlearning loss beside clean '
        'cross-entropy')


def build(ctx):
    args, run = ctx.args, ctx
    model, norm = run.model, run.data.normalizer.normalize_float
    reference = copy.deepcopy(model).eval().requires_grad_(False)

    def loss(x01, y):
        x_adv = shared_pgd(model, reference, x01, y, norm, args.adv_eps, args.adv_eps, args.adv_steps,
                           args.sau_beta_adv, args.sau_beta_shared)
        logits, logits_adv = model(norm(torch.cat([x01, x_adv]))).float().chunk(2)
        with torch.no_grad():
            ref_clean, ref_adv = reference(norm(torch.cat([x01, x_adv]))).argmax(1).chunk(2)
        return F.cross_entropy(logits, y) + args.sau_lmd_shared * shared_unlearning_loss(logits_adv, ref_adv, y,
                                                                                          ref_clean)
    return Steps(batches=raw_batches(args, run), loss=loss, train_mode=False)  # BN frozen (train_mode off)


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
