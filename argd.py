"""ARGD loss (Xia et al., IJCAI 2022): distil the attention relation graph of a teacher.

Vertices are the attention maps of the three groups; the vertex loss matches them one to
one (AT), the edge loss matches how far apart each pair of maps is, and the embedding loss
lets each teacher map attend over all student maps (cross-layer attention with learned
query/key projections). The projections are parameters: they must be optimised together
with the student (the published code never passes them to its optimiser).
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from at import attention_map

EDGE_PAIRS = ((0, 1), (1, 2), (0, 2))


def edge_lengths(a, b, eps=1e-12):
    """Per-sample squared distance between two attention maps (N, 1, H, W), the larger
    average-pooled to the smaller size, divided by its batch maximum."""
    if a.shape[-1] > b.shape[-1]:
        a = F.adaptive_avg_pool2d(a, b.shape[-2:])
    elif b.shape[-1] > a.shape[-1]:
        b = F.adaptive_avg_pool2d(b, a.shape[-2:])
    d = (a - b).flatten(1).pow(2).sum(1).clamp(min=eps)
    return d / d.max()


def edge_loss(maps_s, maps_t):
    return sum(F.mse_loss(edge_lengths(maps_s[i], maps_s[j]), edge_lengths(maps_t[i], maps_t[j]))
               for i, j in EDGE_PAIRS) / len(EDGE_PAIRS)


def projection(in_dim, out_dim):
    return nn.Sequential(nn.Linear(in_dim, out_dim), nn.BatchNorm1d(out_dim))


class ARGDLoss(nn.Module):
    def __init__(self, s_channels, t_channels, vert_weights=(2000, 5000, 2000), w_vert=1.0, w_edge=1.0, w_emb=1.0,
                 qk_dim=128, p=2.0):
        super().__init__()
        self.vert_weights, self.w_vert, self.w_edge, self.w_emb = list(vert_weights), w_vert, w_edge, w_emb
        self.qk_dim, self.p = qk_dim, p
        self.query = nn.ModuleList(projection(c, qk_dim) for c in t_channels)
        self.key = nn.ModuleList(projection(c, qk_dim) for c in s_channels)
        self.pos_bias = nn.Parameter(torch.zeros(len(t_channels), len(s_channels)))

    def vertex(self, maps_s, maps_t):
        """AT on each group: MSE between attention maps, weighted per group."""
        return sum(w * F.mse_loss(s, t) for w, s, t in zip(self.vert_weights, maps_s, maps_t))

    def embedding_weights(self, feats_s, feats_t):
        """Softmax over student layers of query.key/sqrt(d) + position bias: (N, T, S)."""
        q = torch.stack([proj(f.mean((2, 3))) for proj, f in zip(self.query, feats_t)], 1)
        k = torch.stack([proj(f.mean((2, 3))) for proj, f in zip(self.key, feats_s)], 1)
        logits = torch.einsum('ntd,nsd->nts', q, k) / math.sqrt(self.qk_dim) + self.pos_bias
        return logits.softmax(-1)

    def embedding(self, att, maps_s, maps_t):
        """Per teacher layer, the attention-weighted mean squared distance to every student layer's
        map (pooled to its size). Both sides are L2-normalised, so the attention maps serve for
        the channel-mean |a|^p of the definition: pooling is linear and the scale cancels."""
        loss = 0
        for i, mt in enumerate(maps_t):
            v_t = F.normalize(mt.flatten(1), dim=1)
            diffs = torch.stack([(F.normalize(F.adaptive_avg_pool2d(ms, mt.shape[-2:]).flatten(1), dim=1) - v_t)
                                 .pow(2).mean(1) for ms in maps_s], 1)  # (N, S)
            loss = loss + (att[:, i] * diffs).sum(1).mean()
        return loss

    def forward(self, feats_s, feats_t):
        # |a|^p over the feature maps is the costly part: computed once per layer, shared by all terms
        maps_s = [attention_map(f, self.p) for f in feats_s]
        maps_t = [attention_map(f, self.p) for f in feats_t]
        return (self.w_vert * self.vertex(maps_s, maps_t) + self.w_edge * edge_loss(maps_s, maps_t)
                + self.w_emb * self.embedding(self.embedding_weights(feats_s, feats_t), maps_s, maps_t))
