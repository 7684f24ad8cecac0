"""``ArrayDataset``: a data set held as two tensors, images N×C×H×W and int64 labels N.

Images may be given as float (used as they are) or as uint8 pixels with a per-channel
normalisation, x = (u / 255 − mean_c) / std_c. uint8 storage is 4× smaller; ``rows(index)``
and ``dataset[i]`` normalise only what they return, and ``.images`` materialises (and keeps)
the whole float tensor on first use.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.utils.data import Dataset


class ArrayDataset(Dataset):
    """Images (float or uint8, N×C×H×W) and labels (int64, N) with optional uint8 normalisation."""

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
    ):
        if images.ndim != 4:
            raise ValueError(f"images must be N×C×H×W, got shape {tuple(images.shape)}")
        if labels.ndim != 1 or labels.shape[0] != images.shape[0]:
            raise ValueError(f"labels must be a vector of {images.shape[0]} entries, got shape {tuple(labels.shape)}")
        if images.dtype == torch.uint8:
            channels = images.shape[1]
            mean = [0.0] * channels if mean is None else list(mean)
            std = [1.0] * channels if std is None else list(std)
            if len(mean) != channels or len(std) != channels or min(std) <= 0:
                raise ValueError(f"mean/std need {channels} entries with std > 0, got mean={mean} std={std}")
            self._mean = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
            self._std = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
        elif images.is_floating_point():
            if mean is not None or std is not None:
                raise ValueError("mean/std apply to uint8 images only; normalise float images before")
            self._mean = self._std = None
        else:
            raise ValueError(f"images must be float or uint8, got {images.dtype}")
        self._stored = images
        self._float: torch.Tensor | None = images if images.is_floating_point() else None
        self.labels = labels.to(torch.int64)

    def _normalise(self, pixels: torch.Tensor) -> torch.Tensor:
        if self._mean is None:
            return pixels
        return (pixels.to(torch.float32) / 255.0 - self._mean) / self._std

    @property
    def images(self) -> torch.Tensor:
        """All images as float N×C×H×W (for uint8 storage: normalised once, then cached)."""
        if self._float is None:
            self._float = self._normalise(self._stored)
        return self._float

    @property
    def stored(self) -> torch.Tensor:
        """The images as stored (uint8 pixels or float)."""
        return self._stored

    @property
    def normalisation(self) -> tuple[list[float], list[float]] | None:
        """(mean, std) per channel for uint8 storage, else None."""
        if self._mean is None:
            return None
        return self._mean.flatten().tolist(), self._std.flatten().tolist()

    def rows(self, index: torch.Tensor | slice) -> tuple[torch.Tensor, torch.Tensor]:
        """Float images and labels of ``index`` without materialising the whole set."""
        source = self._float if self._float is not None else self._stored
        return self._normalise(source[index]), self.labels[index]

    def subset(self, index: torch.Tensor) -> "ArrayDataset":
        """A new data set of the rows ``index``, in the same storage type."""
        if self._mean is None:
            return ArrayDataset(self._stored[index], self.labels[index])
        mean, std = self.normalisation
        return ArrayDataset(self._stored[index], self.labels[index], mean, std)

    def __len__(self) -> int:
        return self.labels.shape[0]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        source = self._float if self._float is not None else self._stored
        return self._normalise(source[i].unsqueeze(0))[0], self.labels[i]

    def __repr__(self) -> str:
        n, c, h, w = self._stored.shape
        return f"ArrayDataset(n={n}, shape={c}×{h}×{w}, dtype={self._stored.dtype})"
