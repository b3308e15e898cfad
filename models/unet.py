"""The U-Net BTI-DBF's generator is (xuxiong0214/BTIDBF models/unet_model.py, UNet(n_channels=3, num_classes=3,
base_filter_num=32, num_blocks=4)): an encoder of blocks of two 3x3 convolutions, each instance-normed (affine) and
leaky-ReLU'd, 32, 64, 128, 256 channels with 2x2 max pooling between them, a 512-channel bottleneck block, a decoder
of 3x3 stride-2 transposed convolutions (leaky-ReLU'd) each joined by its encoder block's output and followed by a
block, and a 1x1 convolution to 3 channels. Images in, images out, in the classifier's input space.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F


class Block(nn.Module):
    def __init__(self, in_channels, channels):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, 3, padding=1)
        self.norm1 = nn.InstanceNorm2d(channels, affine=True)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)
        self.norm2 = nn.InstanceNorm2d(channels, affine=True)

    def forward(self, x):
        return F.leaky_relu(self.norm2(self.conv2(F.leaky_relu(self.norm1(self.conv1(x))))))


class UNet(nn.Module):
    def __init__(self, channels=3, base=32, blocks=4):
        super().__init__()
        widths = [base * 2 ** i for i in range(blocks)]
        self.down = nn.ModuleList(Block(c_in, c) for c_in, c in zip([channels] + widths[:-1], widths))
        self.bottleneck = Block(widths[-1], 2 * widths[-1])
        ups, c_in = [], 2 * widths[-1]
        for c in reversed(widths):
            ups.append(nn.ModuleDict(dict(up=nn.ConvTranspose2d(c_in, c_in, 3, stride=2, padding=1, output_padding=1),
                                          block=Block(c_in + c, c))))
            c_in = c
        self.up = nn.ModuleList(ups)
        self.out = nn.Conv2d(widths[0], channels, 1)

    def forward(self, x):
        skips = []
        for block in self.down:
            x = block(x)
            skips.append(x)
            x = F.max_pool2d(x, 2)
        x = self.bottleneck(x)
        for stage, skip in zip(self.up, reversed(skips)):
            x = stage['block'](torch.cat([F.leaky_relu(stage['up'](x)), skip], 1))
        return self.out(x)
