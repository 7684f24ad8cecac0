"""Model zoo: ``build_model(name, ...)`` and the names it knows (``MODEL_NAMES``)."""
from ..errors import ModelConfigError, WeightsNotFoundError
from .resnet_small import ResNetSmall
from .small import AlexNetSmall, LeNet5, LeNet5Tanh, VGG16Small
from .zoo import MODEL_NAMES, VIT_CONFIGS, build_model, cached_weights_path, vit_patch_size

__all__ = [
    "MODEL_NAMES",
    "VIT_CONFIGS",
    "AlexNetSmall",
    "LeNet5",
    "LeNet5Tanh",
    "ResNetSmall",
    "ModelConfigError",
    "VGG16Small",
    "WeightsNotFoundError",
    "build_model",
    "cached_weights_path",
    "vit_patch_size",
]
