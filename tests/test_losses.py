"""AT, NAD, ARGD and MCL loss terms against hand computations."""
import copy
import math

import pytest
import torch

from at import at_loss, attention_map, nad_loss
from defenses.argd import ARGDLoss, edge_lengths, edge_loss, embedding_value
from defenses.mcl import contrastive_loss
from inversion import anomaly_indices, detect_target, size_penalty


def test_attention_map_and_at_loss():
    ones, zeros = torch.ones(1, 2, 2, 2), torch.zeros(1, 2, 2, 2)
    # sum over 2 channels of 1^2 = 2 per pixel; L2 norm over 4 pixels = 4 -> 0.5 everywhere
    assert torch.allclose(attention_map(ones), torch.full((1, 1, 2, 2), 0.5), atol=1e-6)
    assert at_loss(ones, zeros).item() == pytest.approx(0.25, abs=1e-6)
    assert nad_loss([ones] * 3, [zeros] * 3, (1, 2, 3)).item() == pytest.approx(1.5, abs=1e-5)


def test_edge_lengths_pool_then_normalise_by_batch_max():
    a = torch.tensor([1.0, 3.0]).view(2, 1, 1, 1).expand(2, 1, 2, 2)  # pooled to 1x1: 1 and 3
    b = torch.tensor([0.0, 1.0]).view(2, 1, 1, 1)
    assert edge_lengths(a, b).tolist() == pytest.approx([0.25, 1.0])  # squared distances 1, 4


def test_edge_loss_by_hand():
    maps = lambda *v: [torch.tensor(x, dtype=torch.float32).view(2, 1, 1, 1) for x in v]
    student = maps([0, 0], [1, 2], [3, 3])
    teacher = maps([0, 0], [0, 0], [0, 0])  # all teacher edges are eps/eps = 1
    # pair (0,1): d=[1,4]/4 -> MSE vs 1 = 0.28125; pair (1,2): d=[4,1]/4 -> 0.28125; pair (0,2): [1,1] -> 0
    assert edge_loss(student, teacher).item() == pytest.approx(0.1875, abs=1e-6)
    assert edge_loss(student, student).item() == 0


def test_embedding_loss_by_hand():
    crit = ARGDLoss(qk_dim=4)
    with torch.no_grad():  # zero projections and position term -> equal logits -> each student map weighted 1/3
        for p in crit.parameters():
            p.zero_()
    left, right = torch.tensor([1.0, 0.0]).view(1, 1, 1, 2), torch.tensor([0.0, 1.0]).view(1, 1, 1, 2)
    maps_t = [left.repeat(2, 1, 1, 1)] * 3
    maps_s = [left.repeat(2, 1, 1, 1), right.repeat(2, 1, 1, 1), right.repeat(2, 1, 1, 1)]
    att = crit.embedding_weights(maps_s, maps_t)
    assert torch.allclose(att, torch.full((2, 3, 3), 1 / 3))
    # values are the normalised squared maps: per teacher map (0 + 1 + 1) / 3, summed over three
    assert crit.embedding(att, maps_s, maps_t).item() == pytest.approx(2.0, abs=1e-5)
    # the value is the square of the map, pooled, then normalised: [3, 1] -> [9, 1] / sqrt(82)
    square = torch.tensor([3.0, 1.0]).view(1, 1, 1, 2)
    assert embedding_value(square, (1, 2)).flatten().tolist() == pytest.approx([9 / 82 ** 0.5, 1 / 82 ** 0.5])


def batch_norm(z):  # BatchNorm1d in training mode at its initial affine (weight 1, bias 0)
    return (z - z.mean(0)) / torch.sqrt(z.var(0, unbiased=False) + 1e-5)


def weights_by_definition(crit, maps_s, maps_t):
    """ARGD's cross-layer attention as riman_distance.py builds it, written out with the raw weights."""
    n, g, d = maps_s[0].shape[0], 3, crit.qk_dim
    lin = lambda seq, z: z @ seq[0].weight.t() + seq[0].bias
    q = torch.stack([batch_norm(lin(crit.query[t], maps_t[t].mean((2, 3)))) for t in range(g)], 1)
    k = torch.stack([batch_norm(lin(crit.key[s], maps_s[s].mean((2, 3)))).relu() for s in range(g)], 1)
    k = batch_norm(lin(crit.bilinear, k.reshape(n * g, d))).view(n, g, g, d)
    logits = torch.empty(n, g, g, dtype=q.dtype)
    for t in range(g):
        for s in range(g):
            logits[:, t, s] = ((k[:, s, t] * q[:, t]).sum(1) + crit.pos_t[t] @ crit.pos_s[s]) / math.sqrt(d)
    return logits.softmax(-1)


def test_argd_total_and_reference_attention():
    torch.manual_seed(0)
    feats_s = [torch.randn(4, c, s, s, requires_grad=True) for c, s in ((16, 8), (32, 4), (64, 2))]
    feats_t = [torch.randn(4, c, s, s) for c, s in ((16, 8), (32, 4), (64, 2))]
    crit = ARGDLoss(w_vert=1, w_edge=2, w_emb=3)
    maps_s = [attention_map(f) for f in feats_s]
    maps_t = [attention_map(f) for f in feats_t]
    att = crit.embedding_weights(maps_s, maps_t)
    # the definition, checked in float64 where rounding cannot hide a wrong term
    crit64, maps64 = copy.deepcopy(crit).double(), [[m.detach().double() for m in ms] for ms in (maps_s, maps_t)]
    att64 = crit64.embedding_weights(*maps64)
    assert torch.allclose(att64, weights_by_definition(crit64, *maps64), rtol=0, atol=1e-12)
    # the float32 weights: BatchNorm over 4 near-equal map means divides by a small spread and amplifies float32
    # rounding (6e-8) ~150x; measured 0.9-1.0e-5 from float64 under the default, avx2 and avx512 kernels
    assert torch.allclose(att.double(), att64, rtol=0, atol=1e-4)
    embedding = crit.embedding(att, maps_s, maps_t)
    vertex = 2000 * at_loss(feats_s[0], feats_t[0]) + 5000 * at_loss(feats_s[1], feats_t[1]) + \
        2000 * at_loss(feats_s[2], feats_t[2])
    assert crit.vertex(maps_s, maps_t).item() == pytest.approx(vertex.item(), rel=1e-6)
    total = crit(feats_s, feats_t)
    assert total.item() == pytest.approx((vertex + 2 * edge_loss(maps_s, maps_t) + 3 * embedding).item(), rel=1e-5)
    total.backward()
    # as in the reference, the projections are fixed: the student gets gradients, they do not
    assert feats_s[0].grad.abs().sum() > 0
    assert all(not p.requires_grad and p.grad is None for p in crit.parameters())


def test_argd_trainable_projections_get_gradients():
    torch.manual_seed(0)
    feats = [torch.randn(4, c, s, s) for c, s in ((16, 8), (32, 4), (64, 2))]
    crit = ARGDLoss(trainable=True)
    crit([f * 1.5 for f in feats], feats).backward()
    assert crit.query[0][0].weight.grad.abs().sum() > 0 and crit.key[2][0].weight.grad.abs().sum() > 0
    assert crit.bilinear[0].weight.grad.abs().sum() > 0 and crit.pos_t.grad.abs().sum() > 0


def test_contrastive_loss_by_hand():
    a, p, n = torch.tensor([[1.0, 0.0]]), torch.tensor([[2.0, 0.0]]), torch.tensor([[0.0, 3.0]])
    # cosines 1 and 0, /0.5 -> logits [2, 0]; CE with class 0 = log(1 + e^-2)
    assert contrastive_loss(a, p, n, 0.5).item() == pytest.approx(math.log(1 + math.exp(-2)), abs=1e-6)


def test_size_penalty_and_anomaly_index():
    assert size_penalty(torch.zeros(3, 2, 2)).item() == pytest.approx(4 * 0.5)
    norms = [10.0, 100, 104, 96, 102, 98]
    idx = anomaly_indices(norms)
    # median 99, MAD = median(|n - 99|) = 3 -> index of class 0 = 89 / (1.4826 * 3)
    assert idx[0] == pytest.approx(89 / (1.4826 * 3))
    assert detect_target(norms)[0] == 0
    assert detect_target([100.0, 101, 99, 100.5])[0] is None
