"""Errors of the model zoo; each message is one line naming the bad input."""
from raybranch.errors import RaybranchError


class ModelConfigError(RaybranchError, ValueError):
    """An unknown model name or a size/channel/weights request the model cannot meet."""


class WeightsNotFoundError(RaybranchError, FileNotFoundError):
    """Pretrained weights are not in the local torch hub cache (raybranch never downloads them)."""
