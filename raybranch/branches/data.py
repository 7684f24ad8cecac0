"""What a run trains on, rebuilt from its config (deterministic from the seed): warm-up part,
validation part, the slices (one of them poisoned) and the test set; and the progress hooks
the commands report to."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..config.classes import ExperimentConfig
from ..data import load_dataset, make_slices, split_spec
from ..poison import flip_labels, poison_backdoor, trigger_value


@dataclass
class Hooks:
    """Progress and log callbacks (the CLI wires a progress bar to them)."""

    phase: Callable[[str], None] = lambda name: None
    step: Callable[[int], None] = lambda step: None
    log: Callable[[str], None] = lambda msg: None


@dataclass
class SplitData:
    warmup: tuple[torch.Tensor, torch.Tensor]
    val: tuple[torch.Tensor, torch.Tensor]
    slices: list[tuple[torch.Tensor, torch.Tensor]]          # index 0 = slice 1
    test: tuple[torch.Tensor, torch.Tensor]
    meta: object
    trigger: torch.Tensor
    sizes: dict = field(default_factory=dict)


def prepare_data(cfg: ExperimentConfig) -> SplitData:
    """Load, cut into warm-up / validation / slices, poison slice ``poison_slice``."""
    train, test, meta = load_dataset(cfg.dataset, cfg.data_dir)
    fracs = split_spec(cfg.split)
    rest = 1.0 - cfg.warmup_fraction - cfg.val_fraction
    parts = make_slices(train.labels, [cfg.warmup_fraction, cfg.val_fraction, *(rest * f for f in fracs)], cfg.seed)
    images, labels = train.images, train.labels
    trigger = trigger_value(images)
    k_idx = parts[2 + cfg.poison_slice - 1]
    poisoned = 0
    if cfg.poison == "backdoor":
        images, labels = poison_backdoor(images, labels, k_idx, cfg.poison_rate, cfg.poison_target,
                                         seed=cfg.seed, size=cfg.trigger_size, value=trigger)
        poisoned = int(round(cfg.poison_rate * k_idx.numel()))
    elif cfg.poison == "flip":
        labels = flip_labels(labels, k_idx, cfg.poison_rate, "next", seed=cfg.seed, num_classes=meta.num_classes)
        poisoned = int((labels[k_idx] != train.labels[k_idx]).sum())
    take = lambda idx: (images[idx], labels[idx])  # noqa: E731
    sizes = {"train": len(train), "test": len(test), "warmup": parts[0].numel(), "val": parts[1].numel(),
             "slices": [p.numel() for p in parts[2:]], "poisoned": poisoned}
    return SplitData(
        warmup=(train.images[parts[0]], train.labels[parts[0]]),
        val=(train.images[parts[1]], train.labels[parts[1]]),
        slices=[take(p) for p in parts[2:]],
        test=(test.images, test.labels),
        meta=meta, trigger=trigger, sizes=sizes,
    )


__all__ = ["Hooks", "SplitData", "prepare_data"]
