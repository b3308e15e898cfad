"""CIFAR ResNet-18/34 (3x3 stem, no max-pool), as used across the backdoor literature."""
import torch.nn as nn
import torch.nn.functional as F


class BasicBlock(nn.Module):
    def __init__(self, in_planes, planes, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet(nn.Module):
    def __init__(self, num_blocks, num_classes):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        planes, layers = 64, []
        for i, (width, n) in enumerate(zip((64, 128, 256, 512), num_blocks)):
            blocks = []
            for j in range(n):
                blocks.append(BasicBlock(planes, width, 2 if (i > 0 and j == 0) else 1))
                planes = width
            layers.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.linear = nn.Linear(512, num_classes)
        self.feature_dim = 512

    def to_features(self, x):
        """The feature map the head pools (BTI-DBF's from_input_to_features): layer4's output."""
        return self.layer4(self.layer3(self.layer2(self.layer1(F.relu(self.bn1(self.conv1(x)))))))

    def from_features(self, f):
        """Logits of a feature map from to_features (pooled, then the head)."""
        return self.linear(F.adaptive_avg_pool2d(f, 1).flatten(1))

    def forward(self, x, features=False):
        out = self.layer1(F.relu(self.bn1(self.conv1(x))))
        a1 = self.layer2(out)
        a2 = self.layer3(a1)
        a3 = self.layer4(a2)
        pooled = F.adaptive_avg_pool2d(a3, 1).flatten(1)
        logits = self.linear(pooled)
        return (logits, (a1, a2, a3), pooled) if features else logits


def ResNet18(num_classes):
    return ResNet((2, 2, 2, 2), num_classes)


def ResNet34(num_classes):
    return ResNet((3, 4, 6, 3), num_classes)
