"""AT, NAD, ARGD and MCL loss terms against hand computations."""
import math

import pytest
import torch
import torch.nn.functional as F

from argd import ARGDLoss, edge_lengths, edge_loss
from at import at_loss, attention_map, nad_loss
from mcl import anomaly_indices, contrastive_loss, detect_target, size_penalty


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
    crit = ARGDLoss([1, 1, 1], [1, 1, 1], qk_dim=4)
    with torch.no_grad():  # zero projections -> equal logits -> each student layer weighted 1/3
        for proj in list(crit.query) + list(crit.key):
            proj[0].weight.zero_()
            proj[0].bias.zero_()
    left, right = torch.tensor([1.0, 0.0]).view(1, 1, 1, 2), torch.tensor([0.0, 1.0]).view(1, 1, 1, 2)
    feats_t = [left.repeat(2, 1, 1, 1)] * 3
    feats_s = [left.repeat(2, 1, 1, 1), right.repeat(2, 1, 1, 1), right.repeat(2, 1, 1, 1)]
    att = crit.embedding_weights(feats_s, feats_t)
    assert torch.allclose(att, torch.full((2, 3, 3), 1 / 3))
    # per teacher layer: (0 + 1 + 1) / 3, summed over three teacher layers
    maps = lambda feats: [attention_map(f) for f in feats]
    assert crit.embedding(att, maps(feats_s), maps(feats_t)).item() == pytest.approx(2.0, abs=1e-5)


def embedding_by_definition(att, feats_s, feats_t, p=2.0):
    """The embedding term as the paper writes it, from channel means of |a|^p."""
    vec = lambda f, size: F.normalize(F.adaptive_avg_pool2d(f.abs().pow(p).mean(1, keepdim=True), size).flatten(1), dim=1)
    loss = 0
    for i, ft in enumerate(feats_t):
        v_t = vec(ft, ft.shape[-2:])
        diffs = torch.stack([(vec(fs, ft.shape[-2:]) - v_t).pow(2).mean(1) for fs in feats_s], 1)
        loss = loss + (att[:, i] * diffs).sum(1).mean()
    return loss


def test_argd_total_and_projection_gradients():
    torch.manual_seed(0)
    feats_s = [torch.randn(4, c, s, s, requires_grad=True) for c, s in ((16, 8), (32, 4), (64, 2))]
    feats_t = [torch.randn(4, c, s, s) for c, s in ((16, 8), (32, 4), (64, 2))]
    crit = ARGDLoss([16, 32, 64], [16, 32, 64], w_vert=1, w_edge=2, w_emb=3)
    maps_s = [attention_map(f) for f in feats_s]
    maps_t = [attention_map(f) for f in feats_t]
    att = crit.embedding_weights(feats_s, feats_t)
    embedding = crit.embedding(att, maps_s, maps_t)
    assert embedding.item() == pytest.approx(embedding_by_definition(att, feats_s, feats_t).item(), rel=1e-5)
    vertex = 2000 * at_loss(feats_s[0], feats_t[0]) + 5000 * at_loss(feats_s[1], feats_t[1]) + \
        2000 * at_loss(feats_s[2], feats_t[2])
    assert crit.vertex(maps_s, maps_t).item() == pytest.approx(vertex.item(), rel=1e-6)
    total = crit(feats_s, feats_t)
    assert total.item() == pytest.approx((vertex + 2 * edge_loss(maps_s, maps_t) + 3 * embedding).item(), rel=1e-6)
    total.backward()
    # the projections are trained with the student, so they must receive gradients
    assert crit.query[0][0].weight.grad.abs().sum() > 0 and crit.key[2][0].weight.grad.abs().sum() > 0
    assert crit.pos_bias.grad is not None


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
