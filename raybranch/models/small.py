"""Small-input CNNs of the report (§6): LeNet-5 (ReLU, and the classic Tanh one) and the "Lite" AlexNet / VGG-16.

All three take ``in_channels`` × ``image_size`` × ``image_size`` inputs (1×28×28 MNIST/digits,
3×32×32 CIFAR-10, or any size the pooling stack does not shrink below 1 pixel) and return
logits ``[N, num_classes]``. None uses BatchNorm, so every tensor in ``state_dict()`` is a
float parameter (no integer buffers) and the LC codec sees only weights.
"""
from __future__ import annotations

import torch
from torch import nn

from ..errors import ModelConfigError


def _pooled(size: int, n_pools: int, ceil: bool = False) -> int:
    """Side length after ``n_pools`` 2×2/stride-2 max pools (floor, or ceil with ``ceil_mode``)."""
    for _ in range(n_pools):
        size = -(-size // 2) if ceil else size // 2
    return size


def _check_size(name: str, side: int, image_size: int) -> None:
    if side < 1:
        raise ModelConfigError(f"{name}: image_size={image_size} is too small (feature map shrinks to {side} px)")


def he_init(model: nn.Module) -> None:
    """torchvision's VGG init for ReLU nets without BatchNorm: He (fan-out) for convolutions,
    N(0, 0.01) for fully connected layers, zero biases."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0, 0.01)
            nn.init.zeros_(m.bias)


class LeNet5(nn.Module):
    """Classic LeNet-5 with ReLU.

    conv(6, 5×5, pad 2) → ReLU → maxpool 2 → conv(16, 5×5) → ReLU → maxpool 2
    → fc 120 → ReLU → fc 84 → ReLU → fc num_classes.
    Feature side after the stack: s' = ⌊(⌊s/2⌋ − 4)/2⌋ (5 for 28 px, 6 for 32 px).
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 1, image_size: int = 28):
        super().__init__()
        side = (image_size // 2 - 4) // 2
        _check_size("lenet5", side, image_size)
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 6, 5, padding=2), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.Conv2d(6, 16, 5), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Linear(16 * side * side, 120), nn.ReLU(inplace=True),
            nn.Linear(120, 84), nn.ReLU(inplace=True),
            nn.Linear(84, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))


class LeNet5Tanh(nn.Module):
    """LeNet-5 as LeCun et al. (1998) built it: Tanh and 2×2 average pooling.

    conv(6, 5×5, pad 2) → tanh → avgpool 2 → conv(16, 5×5) → tanh → avgpool 2
    → fc 120 → tanh → fc 84 → tanh → fc num_classes (the RBF output layer is a linear one here).
    Its updates spread over every weight (tanh never zeroes a gradient), unlike the ReLU one's.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 1, image_size: int = 28):
        super().__init__()
        side = (image_size // 2 - 4) // 2
        _check_size("lenet5-tanh", side, image_size)
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 6, 5, padding=2), nn.Tanh(), nn.AvgPool2d(2),
            nn.Conv2d(6, 16, 5), nn.Tanh(), nn.AvgPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Linear(16 * side * side, 120), nn.Tanh(),
            nn.Linear(120, 84), nn.Tanh(),
            nn.Linear(84, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))


class AlexNetSmall(nn.Module):
    """AlexNet's layer pattern (5 convs, 3 max pools, 3 fully connected) sized for 28–32 px.

    The 11×11/stride-4 stem becomes 5×5/stride-1 and the 4096-wide classifier 1024-wide:
    conv 64(5×5) → pool → conv 192 → pool → conv 384 → conv 256 → conv 256 → pool
    → dropout → fc 1024 → dropout → fc 1024 → fc num_classes (3×3 convs, pad 1, ReLU).
    As in the original, the fully connected layers hold most parameters (≈3.4 M of ≈5.6 M
    at 28 px), which is where Delta-LoRA compresses (report Table 1). He init for the
    convolutions and N(0, 0.01) for the fully connected layers, as torchvision's VGG: with
    PyTorch's default init plain SGD at lr 0.01–0.05 left it at 10–28 % validation accuracy
    after 30 warm-up epochs on digits (docs/DELTA_LORA.md).
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 1, image_size: int = 28):
        super().__init__()
        side = _pooled(image_size, 3)
        _check_size("alexnet-small", side, image_size)
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 64, 5, padding=2), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.Conv2d(64, 192, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.Conv2d(192, 384, 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(384, 256, 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(256, 256, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Dropout(0.5), nn.Linear(256 * side * side, 1024), nn.ReLU(inplace=True),
            nn.Dropout(0.5), nn.Linear(1024, 1024), nn.ReLU(inplace=True),
            nn.Linear(1024, num_classes),
        )
        he_init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))


# VGG-16 configuration "D": 13 3×3 convs, "M" = 2×2 max pool.
VGG16_CFG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")


class VGG16Small(nn.Module):
    """VGG-16 ("Lite"): the 13-conv configuration D without BatchNorm, for small inputs.

    The five pools use ``ceil_mode`` so 28 px → 14 → 7 → 4 → 2 → 1 and 32 px → … → 1, and
    the 4096-wide classifier becomes 512 → 512 → num_classes (with dropout), the usual
    CIFAR-size head. ≈15 M parameters, ≈0.3 GFLOP per 28 px image.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 1, image_size: int = 28):
        super().__init__()
        layers: list[nn.Module] = []
        channels = in_channels
        for item in VGG16_CFG:
            if item == "M":
                layers.append(nn.MaxPool2d(2, ceil_mode=True))
            else:
                layers += [nn.Conv2d(channels, int(item), 3, padding=1), nn.ReLU(inplace=True)]
                channels = int(item)
        self.features = nn.Sequential(*layers)
        side = _pooled(image_size, 5, ceil=True)
        self.classifier = nn.Sequential(
            nn.Linear(512 * side * side, 512), nn.ReLU(inplace=True), nn.Dropout(0.5),
            nn.Linear(512, 512), nn.ReLU(inplace=True), nn.Dropout(0.5),
            nn.Linear(512, num_classes),
        )
        he_init(self)  # VGG's init (torchvision)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))
