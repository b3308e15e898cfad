"""ARGD (Xia et al., IJCAI 2022): distil the attention relation graph of the fine-tuned teacher (FT) into
the backdoored student, beside cross-entropy (main-ARGD.py; the steps are NAD's, defenses/nad.py).

Vertices are the attention maps of the three groups; the vertex loss matches them one to one
(AT), the edge loss matches how far apart each pair of maps is, and the embedding loss lets
each teacher map attend over all student maps (cross-layer attention). Every term works on
the one-channel attention maps, as the reference code (riman_distance.py) does.

The reference never passes the embedding loss's projections to its optimiser: they stay at
their random initialisation (BatchNorm in training mode). That is the default here;
trainable=True optimises them with the student instead.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from at import attention_map
from defenses.nad import distill, distillation_names, distillation_options
from errors import UserError

KEYS = {'argd': dict(label='ARGD', needs=('teacher',)),
        # ARGD with a newer defense's ingredient (not in the paper): FT-SI's synthesised trigger at true labels
        'argd-si': dict(label='ARGD-SI', needs=('teacher',))}
FINDINGS = ('detected', 'anomaly_index')  # with --source inverted: the synthesised trigger's detection
tag, meta_name, output = distillation_names('argd')

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


def linear_bn(in_dim, out_dim, relu=False):
    layers = [nn.Linear(in_dim, out_dim), nn.BatchNorm1d(out_dim)]
    return nn.Sequential(*layers, nn.ReLU()) if relu else nn.Sequential(*layers)


def embedding_value(am, size):
    """An attention map's value vector: its square, average-pooled to `size`, L2-normalised."""
    return F.normalize(F.adaptive_avg_pool2d(am.pow(2), size).flatten(1), dim=1)


class ARGDLoss(nn.Module):
    def __init__(self, groups=3, vert_weights=(2000, 5000, 2000), w_vert=1.0, w_edge=1.0, w_emb=1.0, qk_dim=128,
                 p=2.0, trainable=False):
        super().__init__()
        self.vert_weights, self.w_vert, self.w_edge, self.w_emb = list(vert_weights), w_vert, w_edge, w_emb
        self.qk_dim, self.p, self.groups = qk_dim, p, groups
        # each map enters through its spatial mean (the "channel mean" of a one-channel map)
        self.query = nn.ModuleList(linear_bn(1, qk_dim) for _ in range(groups))            # teacher maps
        self.key = nn.ModuleList(linear_bn(1, qk_dim, relu=True) for _ in range(groups))   # student maps
        self.bilinear = linear_bn(qk_dim, qk_dim * groups)   # one key per (student, teacher) pair
        self.pos_t = nn.Parameter(nn.init.xavier_normal_(torch.empty(groups, qk_dim)))
        self.pos_s = nn.Parameter(nn.init.xavier_normal_(torch.empty(groups, qk_dim)))
        self.requires_grad_(trainable)

    def vertex(self, maps_s, maps_t):
        """AT on each group: MSE between attention maps, weighted per group."""
        return sum(w * F.mse_loss(s, t) for w, s, t in zip(self.vert_weights, maps_s, maps_t))

    def embedding_weights(self, maps_s, maps_t):
        """Softmax over student groups of (key.query + position term) / sqrt(d): (N, T, S)."""
        n, g = maps_s[0].shape[0], self.groups
        q = torch.stack([proj(m.mean((2, 3))) for proj, m in zip(self.query, maps_t)], 1)     # (N, T, d)
        k = torch.stack([proj(m.mean((2, 3))) for proj, m in zip(self.key, maps_s)], 1)       # (N, S, d)
        k = self.bilinear(k.flatten(0, 1)).view(n, g, g, self.qk_dim)                         # (N, S, T, d)
        logits = (torch.einsum('nstd,ntd->nts', k, q) + self.pos_t @ self.pos_s.t()) / math.sqrt(self.qk_dim)
        return logits.softmax(-1)

    def embedding(self, att, maps_s, maps_t):
        """Per teacher group, the attention-weighted mean squared distance between its value and
        every student group's value (pooled to the teacher map's size)."""
        loss = 0
        for i, mt in enumerate(maps_t):
            size = mt.shape[-2:]
            v_t = embedding_value(mt, size)
            diffs = torch.stack([(embedding_value(ms, size) - v_t).pow(2).mean(1) for ms in maps_s], 1)  # (N, S)
            loss = loss + (att[:, i] * diffs).sum(1).mean()
        return loss

    def forward(self, feats_s, feats_t):
        # |a|^p over the feature maps is the costly part: computed once per layer, shared by all terms
        maps_s = [attention_map(f, self.p) for f in feats_s]
        maps_t = [attention_map(f, self.p) for f in feats_t]
        return (self.w_vert * self.vertex(maps_s, maps_t) + self.w_edge * edge_loss(maps_s, maps_t)
                + self.w_emb * self.embedding(self.embedding_weights(maps_s, maps_t), maps_s, maps_t))


def options(add):
    distillation_options(add)
    add('--vert_weights', help='ARGD: vertex (AT) weights of groups 1,2,3')
    add('--w_vert', type=float, help='ARGD: weight of the vertex loss')
    add('--w_edge', type=float, help='ARGD: weight of the edge (relation graph) loss')
    add('--w_emb', type=float, help='ARGD: weight of the embedding (cross-layer attention) loss')
    add('--qk_dim', type=int, help='ARGD: query/key dimension of the embedding loss')
    add('--train_projections', action='store_true', help="ARGD: optimise the embedding loss's query/key "
        'projections with the student (the reference leaves them at their random initialisation)')


def check(args):
    try:
        args.vert_weights = [float(v) for v in str(args.vert_weights).split(',')]
        assert len(args.vert_weights) == 3
    except (ValueError, AssertionError):
        raise UserError(f"--vert_weights needs three comma-separated numbers, got '{args.vert_weights}'")


def build(ctx):
    """The student (ctx.model) distilled from the teacher; the loss's projections resume with the run."""
    args, run, teacher = ctx.args, ctx, ctx.teacher
    criterion = ARGDLoss(3, args.vert_weights, args.w_vert, args.w_edge, args.w_emb, args.qk_dim, args.p,
                         trainable=args.train_projections).to(run.device)
    return distill(args, run, run.model, teacher, criterion, {'argd': criterion})
