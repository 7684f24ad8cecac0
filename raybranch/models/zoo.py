"""Model registry: ``build_model(name, ...)`` for every model the report trains (§6).

Small-input CNNs (``lenet5``, ``lenet5-tanh``, ``alexnet-small``, ``vgg16-small``) live in ``small.py``,
``resnet-small`` in ``resnet_small.py``;
torchvision's full ``vgg16``, ``resnet50`` and ``vit_b_16`` and the small ViTs of §6.3
(``vit-tiny``, ``vit-small``, built on ``torchvision.models.VisionTransformer``) live here.

Pretrained weights are read only from the local torch hub cache
(``$TORCH_HOME/hub/checkpoints/<file>``, default ``~/.cache/torch/hub/checkpoints``); nothing
is downloaded. A missing file is an error that names the path and the URL to fetch it from.
"""
from __future__ import annotations

import math
import os
from collections.abc import Callable

import torch
import torchvision
from torch import nn
from torchvision.models import vision_transformer as tv_vit

from ..errors import ModelConfigError, WeightsNotFoundError
from .resnet_small import ResNetSmall
from .small import AlexNetSmall, LeNet5, LeNet5Tanh, VGG16Small

# Small ViTs of the report (§6.3.1 / §6.3.2): heads, blocks, hidden_dim, mlp_size.
VIT_CONFIGS: dict[str, dict[str, int]] = {
    "vit-tiny": {"num_heads": 2, "num_layers": 2, "hidden_dim": 8, "mlp_dim": 24},
    "vit-small": {"num_heads": 8, "num_layers": 8, "hidden_dim": 512, "mlp_dim": 2048},
}

# torchvision full models: (constructor, weights enum).
_TORCHVISION: dict[str, tuple[Callable[..., nn.Module], torchvision.models.WeightsEnum]] = {
    "vgg16": (torchvision.models.vgg16, torchvision.models.VGG16_Weights.DEFAULT),
    "resnet50": (torchvision.models.resnet50, torchvision.models.ResNet50_Weights.DEFAULT),
    "vit_b_16": (torchvision.models.vit_b_16, torchvision.models.ViT_B_16_Weights.DEFAULT),
}

_SMALL: dict[str, type[nn.Module]] = {
    "lenet5": LeNet5,
    "lenet5-tanh": LeNet5Tanh,
    "resnet-small": ResNetSmall,
    "alexnet-small": AlexNetSmall,
    "vgg16-small": VGG16Small,
}

MODEL_NAMES: tuple[str, ...] = (*_SMALL, *_TORCHVISION, *VIT_CONFIGS)


def vit_patch_size(image_size: int) -> int:
    """Patch side for a ViT on ``image_size`` px: 16 from 128 px up, 8 from 64 px, else 4
    (7×7 patches of 4 px on 28 px, 8×8 on 32 px); falls back to the largest divisor ≤ that."""
    preferred = 16 if image_size >= 128 else 8 if image_size >= 64 else 4
    return next(p for p in range(min(preferred, image_size), 0, -1) if image_size % p == 0)


def build_model(
    name: str,
    num_classes: int = 10,
    in_channels: int = 1,
    image_size: int = 28,
    pretrained: bool = False,
) -> nn.Module:
    """Build model ``name`` (one of ``MODEL_NAMES``) for ``in_channels``×``image_size``² inputs.

    ``pretrained=True`` is only meaningful for the torchvision models (ImageNet weights read from
    the local cache; the classifier is replaced by a fresh ``num_classes`` head, a 1-channel
    stem gets the RGB filters summed, and ViT position embeddings are interpolated to
    ``image_size``).
    """
    if name not in MODEL_NAMES:
        raise ModelConfigError(f"unknown model {name!r}; choose one of {', '.join(MODEL_NAMES)}")
    if num_classes < 1 or in_channels < 1 or image_size < 1:
        raise ModelConfigError(
            f"{name}: num_classes, in_channels and image_size must be positive "
            f"(got {num_classes}, {in_channels}, {image_size})"
        )
    if name in _TORCHVISION:
        return _build_torchvision(name, num_classes, in_channels, image_size, pretrained)
    if pretrained:
        raise ModelConfigError(
            f"{name}: no pretrained weights exist; train a branch point first "
            f"(pretrained=True works for {', '.join(_TORCHVISION)})"
        )
    if name in _SMALL:
        return _SMALL[name](num_classes=num_classes, in_channels=in_channels, image_size=image_size)
    return _build_small_vit(name, num_classes, in_channels, image_size)


def _build_small_vit(name: str, num_classes: int, in_channels: int, image_size: int) -> nn.Module:
    cfg = VIT_CONFIGS[name]
    if cfg["hidden_dim"] % cfg["num_heads"]:
        raise ModelConfigError(f"{name}: hidden_dim {cfg['hidden_dim']} not divisible by {cfg['num_heads']} heads")
    patch = vit_patch_size(image_size)
    model = tv_vit.VisionTransformer(image_size=image_size, patch_size=patch, num_classes=num_classes, **cfg)
    if in_channels != 3:
        model.conv_proj = _vit_stem(in_channels, cfg["hidden_dim"], patch)
    return model


def _vit_stem(in_channels: int, hidden_dim: int, patch: int) -> nn.Conv2d:
    """Patchify conv for ``in_channels``, initialised as torchvision does: N(0, 1/fan_in) truncated."""
    conv = nn.Conv2d(in_channels, hidden_dim, kernel_size=patch, stride=patch)
    nn.init.trunc_normal_(conv.weight, std=math.sqrt(1.0 / (in_channels * patch * patch)))
    nn.init.zeros_(conv.bias)
    return conv


def cached_weights_path(weights: torchvision.models.WeightsEnum) -> str:
    """Where torch hub keeps ``weights`` once downloaded: ``<hub dir>/checkpoints/<file of url>``."""
    return os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(weights.url))


def _load_cached_state(name: str, weights: torchvision.models.WeightsEnum) -> dict[str, torch.Tensor]:
    path = cached_weights_path(weights)
    if not os.path.isfile(path):
        raise WeightsNotFoundError(
            f"{name}: pretrained weights not found at {path}; download {weights.url} to that path "
            f"(or point TORCH_HOME at a cache that holds it) — raybranch never downloads weights"
        )
    return torch.load(path, map_location="cpu", weights_only=True)


def _build_torchvision(name: str, num_classes: int, in_channels: int, image_size: int, pretrained: bool) -> nn.Module:
    ctor, weights = _TORCHVISION[name]
    if name == "vit_b_16":
        if image_size % 16:
            raise ModelConfigError(f"vit_b_16: image_size {image_size} is not a multiple of the 16 px patch")
        model = ctor(weights=None, image_size=image_size, num_classes=1000 if pretrained else num_classes)
    else:
        model = ctor(weights=None, num_classes=1000 if pretrained else num_classes)
    if pretrained:
        state = _load_cached_state(name, weights)
        if name == "vit_b_16" and image_size != 224:
            state = tv_vit.interpolate_embeddings(image_size, 16, state)
        model.load_state_dict(state)
        _replace_head(name, model, num_classes)
    if in_channels != 3:
        _replace_stem(name, model, in_channels, keep_rgb=pretrained)
    return model


def _replace_head(name: str, model: nn.Module, num_classes: int) -> None:
    """Swap the 1000-way ImageNet classifier for a freshly initialised ``num_classes`` one."""
    if name == "vgg16":
        old = model.classifier[6]
        model.classifier[6] = nn.Linear(old.in_features, num_classes)
    elif name == "resnet50":
        model.fc = nn.Linear(model.fc.in_features, num_classes)
    else:
        head = nn.Linear(model.heads.head.in_features, num_classes)
        nn.init.zeros_(head.weight)  # torchvision's ViT head init
        nn.init.zeros_(head.bias)
        model.heads.head = head


def _replace_stem(name: str, model: nn.Module, in_channels: int, keep_rgb: bool) -> None:
    """Give the first conv ``in_channels`` inputs. With pretrained RGB filters W (out×3×k×k),
    a 1-channel stem takes Σ_c W[:, c] (a grey image x gives the response the RGB image
    (x, x, x) would); other channel counts repeat the mean filter: W' = mean_c W · 3/in_channels."""
    if name == "vgg16":
        old = model.features[0]
    elif name == "resnet50":
        old = model.conv1
    else:
        old = model.conv_proj
    new = nn.Conv2d(
        in_channels, old.out_channels, old.kernel_size, old.stride, old.padding, bias=old.bias is not None
    )
    with torch.no_grad():
        if keep_rgb:
            mean = old.weight.mean(dim=1, keepdim=True)
            new.weight.copy_(mean.expand(-1, in_channels, -1, -1) * (3.0 / in_channels))
            if old.bias is not None:
                new.bias.copy_(old.bias)
        elif name == "vit_b_16":
            new = _vit_stem(in_channels, old.out_channels, old.kernel_size[0])
        else:  # torchvision's conv init for VGG and ResNet
            nn.init.kaiming_normal_(new.weight, mode="fan_out", nonlinearity="relu")
            if new.bias is not None:
                nn.init.zeros_(new.bias)
    if name == "vgg16":
        model.features[0] = new
    elif name == "resnet50":
        model.conv1 = new
    else:
        model.conv_proj = new
