"""A slice of training data from image files, for a run whose data arrive over time.

``read_image_slice(path, meta)`` reads an image folder ``path/<class>/*.png|jpg|…`` (the
``imagefolder`` layout the data layer reads) for a data set described by ``meta``: the class
folders must be among ``meta.classes`` (label = index there), and each image becomes
``meta.in_channels`` channels (grey or RGB) of ``meta.image_size``² pixels, centre-cropped to a
square and resized (bilinear). It returns uint8 pixels N×C×S×S and int64 labels: the bytes a
run stores and hashes. ``normalise(pixels, meta)`` turns them into the model's input with the
data set's own normalisation,

    x = (u / 255 − mean_c) / std_c,

the one :func:`raybranch.data.load_dataset` applies (for digits, whose 16 grey levels are
scaled to [0, 1] before their mean and std are taken, u / 255 is that same scale).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..errors import DataError, DatasetNotFoundError
from .datasets import IMAGE_EXTENSIONS, DatasetMeta


def read_image_slice(path: str | Path, meta: DatasetMeta) -> tuple[torch.Tensor, torch.Tensor]:
    """(uint8 pixels N×C×S×S, int64 labels) of the image folder ``path`` (see the module docstring)."""
    from PIL import Image, ImageOps

    root = Path(path)
    if not root.is_dir():
        raise DatasetNotFoundError(f"--data {root}: not a directory of <class>/ folders of images")
    classes = {str(c): i for i, c in enumerate(meta.classes)}
    folders = sorted(d for d in root.iterdir() if d.is_dir())
    unknown = [d.name for d in folders if d.name not in classes]
    if unknown:
        raise DataError(f"--data {root}: class folders {unknown} are not classes of {meta.name} ({', '.join(classes)})")
    files = [(f, classes[d.name]) for d in folders for f in sorted(d.iterdir()) if f.suffix.lower() in IMAGE_EXTENSIONS]
    if not files:
        raise DatasetNotFoundError(f"--data {root}: no images ({', '.join(IMAGE_EXTENSIONS)}) in its class folders")
    mode = "L" if meta.in_channels == 1 else "RGB"
    if meta.in_channels not in (1, 3):
        raise DataError(f"--data: images can fill 1 or 3 channels, {meta.name} has {meta.in_channels}")
    size = meta.image_size
    out = np.empty((len(files), size, size, meta.in_channels), dtype=np.uint8)
    for i, (f, _) in enumerate(files):  # file I/O: one image at a time
        try:
            with Image.open(f) as img:
                arr = np.asarray(ImageOps.fit(img.convert(mode), (size, size), Image.BILINEAR))
        except OSError as exc:
            raise DataError(f"--data: cannot read image {f}: {exc}") from None
        out[i] = arr.reshape(size, size, meta.in_channels)
    pixels = torch.from_numpy(out).permute(0, 3, 1, 2).contiguous()
    labels = torch.tensor([label for _, label in files], dtype=torch.int64)
    return pixels, labels


def normalise(pixels: torch.Tensor, meta: DatasetMeta) -> torch.Tensor:
    """uint8 pixels → float model input, x = (u / 255 − mean_c) / std_c (per channel of ``meta``)."""
    mean = torch.tensor(meta.mean, dtype=torch.float32).view(1, -1, 1, 1)
    std = torch.tensor(meta.std, dtype=torch.float32).view(1, -1, 1, 1)
    return (pixels.to(torch.float32) / 255.0 - mean) / std


__all__ = ["normalise", "read_image_slice"]
