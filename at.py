"""Attention transfer (Zagoruyko & Komodakis, 2017) and the NAD loss built on it."""
import torch.nn.functional as F


def attention_map(fm, p=2.0, eps=1e-6):
    """Sum over channels of |a|^p, L2-normalised per sample: (N, C, H, W) -> (N, 1, H, W)."""
    am = fm.float().abs().pow(p).sum(1, keepdim=True)  # fp32 even under bf16 autocast: a loss term
    return am / (am.flatten(1).norm(dim=1).view(-1, 1, 1, 1) + eps)


def at_loss(fm_s, fm_t, p=2.0):
    """MSE between the student's and the teacher's attention maps."""
    return F.mse_loss(attention_map(fm_s, p), attention_map(fm_t, p))


def nad_loss(feats_s, feats_t, betas, p=2.0):
    """NAD's distillation term: sum_i beta_i * AT(group i); add cross-entropy outside."""
    return sum(b * at_loss(s, t, p) for b, s, t in zip(betas, feats_s, feats_t))
