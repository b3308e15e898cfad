"""CIFAR WideResNet (Zagoruyko & Komodakis), no dropout.

Parameter names follow the NAD/ARGD/MCL checkpoints exactly (conv1, block1.layer.0.bn1,
block2.layer.0.convShortcut, bn1, fc, ...), so published state_dicts load unchanged.
"""
import torch.nn as nn
import torch.nn.functional as F


class BasicBlock(nn.Module):
    def __init__(self, in_planes, out_planes, stride):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(in_planes, out_planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(out_planes, out_planes, 3, 1, 1, bias=False)
        self.equal_in_out = in_planes == out_planes
        self.convShortcut = None if self.equal_in_out else nn.Conv2d(in_planes, out_planes, 1, stride, 0, bias=False)

    def forward(self, x):
        out = self.relu1(self.bn1(x))
        # pre-activation block: a projection shortcut sees the activated input, an identity one the raw input
        shortcut = x if self.equal_in_out else self.convShortcut(out)
        out = self.conv2(self.relu2(self.bn2(self.conv1(out))))
        return shortcut + out


class NetworkBlock(nn.Module):
    def __init__(self, n_layers, in_planes, out_planes, stride):
        super().__init__()
        self.layer = nn.Sequential(*[BasicBlock(in_planes if i == 0 else out_planes, out_planes, stride if i == 0 else 1)
                                     for i in range(n_layers)])

    def forward(self, x):
        return self.layer(x)


class WideResNet(nn.Module):
    def __init__(self, depth, num_classes, widen_factor=1):
        super().__init__()
        assert (depth - 4) % 6 == 0, 'WRN depth must be 6n+4'
        n = (depth - 4) // 6
        ch = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.conv1 = nn.Conv2d(3, ch[0], 3, 1, 1, bias=False)
        self.block1 = NetworkBlock(n, ch[0], ch[1], 1)
        self.block2 = NetworkBlock(n, ch[1], ch[2], 2)
        self.block3 = NetworkBlock(n, ch[2], ch[3], 2)
        self.bn1 = nn.BatchNorm2d(ch[3])
        self.relu = nn.ReLU(inplace=True)
        self.fc = nn.Linear(ch[3], num_classes)
        self.feature_dim = ch[3]
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode='fan_out', nonlinearity='relu')
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def to_features(self, x):
        """The feature map the head pools (BTI-DBF's from_input_to_features): the last block, batch-normed, ReLU'd."""
        return self.relu(self.bn1(self.block3(self.block2(self.block1(self.conv1(x))))))

    def from_features(self, f):
        """Logits of a feature map from to_features (pooled, then the head)."""
        return self.fc(F.adaptive_avg_pool2d(f, 1).flatten(1))

    def forward(self, x, features=False):
        a1 = self.block1(self.conv1(x))
        a2 = self.block2(a1)
        a3 = self.block3(a2)
        pooled = F.adaptive_avg_pool2d(self.relu(self.bn1(a3)), 1).flatten(1)
        logits = self.fc(pooled)
        return (logits, (a1, a2, a3), pooled) if features else logits
