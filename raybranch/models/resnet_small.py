"""A small residual network with BatchNorm (``resnet-small``): ResNet-20's layout at a quarter width.

stem conv 3×3 (8) → BN → ReLU → 3 stages of ``blocks`` basic blocks (8, 16, 32 channels; stride 2
at the start of stages 2 and 3, a 1×1 conv + BN shortcut there) → global average pool → fc.
A basic block is y = ReLU(BN(conv(ReLU(BN(conv(x))))) + shortcut(x)).

It brings what LeNet lacks to the codec benchmarks: skip connections, and float buffers
(BatchNorm running statistics) plus an integer one (``num_batches_tracked``) in the state.
"""
from __future__ import annotations

import torch
from torch import nn

from ..errors import ModelConfigError


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(y)) + self.shortcut(x))


class ResNetSmall(nn.Module):
    def __init__(self, num_classes: int = 10, in_channels: int = 1, image_size: int = 28, blocks: int = 3, width: int = 8):
        super().__init__()
        if image_size < 4:
            raise ModelConfigError(f"resnet-small: image_size={image_size} is too small (two stride-2 stages need >= 4 px)")
        self.stem = nn.Sequential(nn.Conv2d(in_channels, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True))
        layers, cin = [], width
        for stage, cout in enumerate((width, 2 * width, 4 * width)):
            for b in range(blocks):
                layers.append(BasicBlock(cin, cout, 2 if stage > 0 and b == 0 else 1))
                cin = cout
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(cin, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.layers(self.stem(x))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(y, 1), 1))
