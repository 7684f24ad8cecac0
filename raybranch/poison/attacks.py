"""Data poisoning for a slice (report §7): label flipping and a BadNets-style backdoor.

- ``flip_labels``: a ``fraction`` of the given indices get y ← m(y), with m(y) = (y + 1) mod C
  ("next") or an explicit {source: target} mapping.
- ``add_trigger``: a ``size``×``size`` square patch at the image's corner set to the top of
  the normalised pixel range (per channel, the maximum over the images given), the trigger of
  BadNets (Gu et al., 2017).
- ``poison_backdoor``: a ``rate`` of the given indices get the trigger and label ``target``.
- ``attack_success_rate``: among test inputs whose true label ≠ target,
  the share classified as ``target`` once triggered,
  ASR = |{i : y_i ≠ t, f(trigger(x_i)) = t}| / |{i : y_i ≠ t}|.

Every function returns new tensors and leaves its inputs untouched.
"""
from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from ..errors import PoisonConfigError

POSITIONS = ("bottom-right", "bottom-left", "top-right", "top-left")



def _choose(indices: torch.Tensor, share: float, seed: int, what: str) -> torch.Tensor:
    """round(share · len(indices)) of ``indices``, drawn without replacement (seeded)."""
    if not 0.0 <= share <= 1.0:
        raise PoisonConfigError(f"{what} must lie in [0, 1], got {share}")
    indices = torch.as_tensor(indices, dtype=torch.int64).reshape(-1)
    if indices.unique().numel() != indices.numel():
        raise PoisonConfigError(f"{what}: indices hold duplicates")
    count = int(round(share * indices.numel()))
    gen = torch.Generator().manual_seed(seed)
    return indices[torch.randperm(indices.numel(), generator=gen)[:count]]


def flip_labels(
    labels: torch.Tensor,
    indices: torch.Tensor,
    fraction: float,
    mapping: Mapping[int, int] | str = "next",
    seed: int = 0,
    num_classes: int | None = None,
) -> torch.Tensor:
    """New labels with ``fraction`` of ``indices`` mapped: "next" is y → (y+1) mod C
    (C = ``num_classes`` or max label + 1); a dict maps listed classes and keeps the others."""
    num_classes = int(labels.max()) + 1 if num_classes is None else num_classes
    lut = torch.arange(num_classes, dtype=torch.int64)
    if mapping == "next":
        lut = (lut + 1) % num_classes
    elif isinstance(mapping, Mapping):
        bad = [(s, t) for s, t in mapping.items() if not (0 <= s < num_classes and 0 <= t < num_classes)]
        if bad:
            raise PoisonConfigError(f"label mapping {bad} leaves the classes 0..{num_classes - 1}")
        if mapping:
            lut[torch.tensor(list(mapping.keys()))] = torch.tensor(list(mapping.values()))
    else:
        raise PoisonConfigError(f"mapping must be 'next' or a dict of class → class, got {mapping!r}")
    chosen = _choose(indices, fraction, seed, "flip fraction")
    flipped = labels.clone()
    flipped[chosen] = lut[labels[chosen]]
    return flipped


def _patch_slices(height: int, width: int, size: int, position: str) -> tuple[slice, slice]:
    if position not in POSITIONS:
        raise PoisonConfigError(f"trigger position {position!r} is not one of {', '.join(POSITIONS)}")
    if not 1 <= size <= min(height, width):
        raise PoisonConfigError(f"trigger size {size} does not fit {height}×{width} images")
    rows = slice(height - size, height) if position.startswith("bottom") else slice(0, size)
    cols = slice(width - size, width) if position.endswith("right") else slice(0, size)
    return rows, cols


def trigger_value(images: torch.Tensor) -> torch.Tensor:
    """Per-channel top of the normalised pixel range in ``images``: max over N, H, W (shape C)."""
    return images.amax(dim=(0, 2, 3))


def add_trigger(
    images: torch.Tensor,
    size: int = 3,
    value: float | torch.Tensor | None = None,
    position: str = "bottom-right",
) -> torch.Tensor:
    """Copy of N×C×H×W ``images`` with a ``size``² square at ``position`` set to ``value``
    (scalar or per channel; default ``trigger_value(images)``, i.e. white after normalisation)."""
    if images.ndim != 4:
        raise PoisonConfigError(f"images must be N×C×H×W, got shape {tuple(images.shape)}")
    rows, cols = _patch_slices(images.shape[2], images.shape[3], size, position)
    fill = trigger_value(images) if value is None else torch.as_tensor(value)
    fill = fill.to(images.device, images.dtype)
    if fill.ndim and fill.numel() != images.shape[1]:
        raise PoisonConfigError(f"trigger value has {fill.numel()} entries for {images.shape[1]} channels")
    out = images.clone()
    out[:, :, rows, cols] = fill.reshape(-1, 1, 1) if fill.ndim else fill
    return out


def poison_backdoor(
    images: torch.Tensor,
    labels: torch.Tensor,
    indices: torch.Tensor,
    rate: float,
    target: int,
    seed: int = 0,
    size: int = 3,
    value: float | torch.Tensor | None = None,
    position: str = "bottom-right",
) -> tuple[torch.Tensor, torch.Tensor]:
    """New (images, labels): ``rate`` of ``indices`` carry the trigger and label ``target``.
    The trigger value defaults to ``trigger_value(images)`` over all of ``images``."""
    if target < 0:
        raise PoisonConfigError(f"backdoor target must be a class id ≥ 0, got {target}")
    chosen = _choose(indices, rate, seed, "backdoor rate")
    fill = trigger_value(images) if value is None else value
    out_images = images.clone()
    out_images[chosen] = add_trigger(images[chosen], size=size, value=fill, position=position)
    out_labels = labels.clone()
    out_labels[chosen] = target
    return out_images, out_labels


@torch.no_grad()
def attack_success_rate(
    model: nn.Module,
    test_images: torch.Tensor,
    test_labels: torch.Tensor,
    target: int,
    batch_size: int = 512,
    size: int = 3,
    value: float | torch.Tensor | None = None,
    position: str = "bottom-right",
) -> float:
    """Share of triggered test inputs with true label ≠ ``target`` that ``model`` classifies as
    ``target``. The trigger value defaults to ``trigger_value(test_images)``."""
    keep = test_labels != target
    if not bool(keep.any()):
        raise PoisonConfigError(f"no test input has a true label other than the target {target}")
    fill = trigger_value(test_images) if value is None else value
    candidates = test_images[keep]
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    was_training = model.training
    model.eval()
    hits = 0
    try:
        for start in range(0, candidates.shape[0], batch_size):
            batch = add_trigger(candidates[start : start + batch_size], size=size, value=fill, position=position)
            hits += int((model(batch.to(device)).argmax(dim=1) == target).sum())
    finally:
        model.train(was_training)
    return hits / candidates.shape[0]
