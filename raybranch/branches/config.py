"""What an experiment (:mod:`raybranch.branches.experiment`) is given: its configuration, its
progress hooks and its data — warm-up part, validation part, the slices (one of them poisoned)
and the test set."""
from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..data import load_dataset, make_slices, split_spec
from ..errors import RaybranchError
from ..poison import flip_labels, poison_backdoor, trigger_value

MECHANISMS = ("lc", "lc+dlora")
SLICE_END = ("exact", "lossy")
LORA_MERGE = ("none", "slice-end")
POISON_KINDS = ("backdoor", "flip", "none")
BRANCH_KEYS = (
    "compression_ratio", "space_savings", "bytes_stored", "bytes_torch_save", "checkpoints",
    "acc_restored", "acc_full", "per_slice_acc", "attack_success_rate",
)
RECOVERY_KEYS = (
    "instant_seconds", "replay_seconds", "retrain_from_scratch_seconds", "acc_replay", "acc_oracle",
    "asr_before", "asr_after",
)


@dataclass
class ExperimentConfig:
    """Everything a run depends on; defaults are the offline demo (LeNet-5 on digits)."""

    name: str = "demo"                 # run names are <name>-lc, <name>-lc-dlora
    model: str = "lenet5"
    dataset: str = "digits"
    data_dir: str | None = None
    split: str = "4x25"
    warmup_fraction: float = 0.15      # of the training set: trains the branch point
    val_fraction: float = 0.10         # of the training set: early stopping
    seed: int = 0
    branch_point_target: float = 0.75  # validation accuracy of the branch point
    branch_point_max_epochs: int = 40
    lr: float = 0.05                   # plain SGD (report: SGD, lr 0.08, batch 128 on MNIST)
    lora_lr: float = 0.1               # SGD lr of the Delta-LoRA models
    batch_size: int = 32
    epochs: int = 30                   # per slice, at most
    patience: int = 6                  # epochs without a better validation accuracy (0: no early stopping)
    checkpoint_every: int = 1
    slice_end: str = "exact"           # exact | lossy: slice-end checkpoints as exact key frames, or deltas like any step
    settle: int = 0                    # superseded by slice_end="exact"; extra re-saves of the slice-end state (see train.loop)
    serve_snapshot: tuple[str, ...] = MECHANISMS  # mechanisms whose clean slice ends are exact snapshots
    poison: str = "backdoor"           # backdoor | flip | none
    poison_slice: int = 3              # 1-based; also the slice quarantined
    poison_rate: float = 0.2           # share of the slice's images poisoned
    poison_target: int = 0
    trigger_size: int = 6              # px of 28 (a 3 px patch is not learnt before early stopping)
    mechanisms: tuple[str, ...] = MECHANISMS
    codec: str = "uniform"             # uniform (default) | lc (LC-checkpoint, the baseline)
    residual: float = 0.95             # uniform: every restored step within this many step-updates of the trained one
    bits: int = 3
    granularity: str = "tensor"
    snapshot_every: int | None = None  # deltas between exact key frames (None: the Checkpointer's default)
    segment_size: int = 0              # > 0: compact pages of that many commits (0: group commits, written once)
    flush_every: int = 64              # steps per group commit: what a killed worker may have to train again
    lora_pattern: str = "classifier"
    lora_rank: int = 8
    lora_scale: float = 0.5
    lora_merge: str = "none"           # none | slice-end (merge & re-initialise A, B)
    compare_lora_merge: bool = False   # also run main with the other merge policy, record both

    def checkpointer_kwargs(self) -> dict:
        """The Checkpointer settings every branch of the experiment uses."""
        return dict(codec=self.codec, residual=self.residual, bits=self.bits, granularity=self.granularity,
                    snapshot_every=self.snapshot_every, segment_size=self.segment_size, flush_every=self.flush_every,
                    save_rng=False)  # batch order is seeded, not global RNG

    def exact_slice_end(self, mech: str, branch: str) -> bool:
        """Whether ``branch``'s slice ends are exact key frames (all of them with slice_end="exact";
        otherwise the clean branch's of the ``serve_snapshot`` mechanisms, which are served)."""
        return self.slice_end == "exact" or (mech in self.serve_snapshot and branch == "clean")

    def validate(self) -> None:
        fracs = split_spec(self.split)
        if not 0 < self.warmup_fraction < 1 or not 0 < self.val_fraction < 1 or self.warmup_fraction + self.val_fraction >= 1:
            raise RaybranchError(f"warmup_fraction {self.warmup_fraction} and val_fraction {self.val_fraction} must be in (0, 1) and sum below 1")
        if self.poison not in POISON_KINDS:
            raise RaybranchError(f"poison must be one of {POISON_KINDS}, got {self.poison!r}")
        if not 1 <= self.poison_slice <= len(fracs):
            raise RaybranchError(f"poison_slice {self.poison_slice} is not one of the slices 1..{len(fracs)} of split {self.split!r}")
        bad = [m for m in (*self.mechanisms, *self.serve_snapshot) if m not in MECHANISMS]
        if bad or not self.mechanisms:
            raise RaybranchError(f"mechanisms and serve_snapshot must be subsets of {MECHANISMS} (mechanisms non-empty), got {list(self.mechanisms)}, {list(self.serve_snapshot)}")
        if self.patience < 0 or self.epochs < 1 or self.batch_size < 1:
            raise RaybranchError(f"epochs and batch_size must be ≥ 1 and patience ≥ 0, got {self.epochs}, {self.batch_size}, {self.patience}")
        if self.slice_end not in SLICE_END:
            raise RaybranchError(f"slice_end must be one of {SLICE_END}, got {self.slice_end!r}")
        if self.lora_merge not in LORA_MERGE:
            raise RaybranchError(f"lora_merge must be one of {LORA_MERGE}, got {self.lora_merge!r}")

    @classmethod
    def quick(cls, **overrides) -> "ExperimentConfig":
        """The ``--quick`` demo: fewer epochs and a shorter patience."""
        return cls(**{"epochs": 8, "patience": 2, "branch_point_max_epochs": 20, **overrides})

    def as_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["mechanisms"] = list(self.mechanisms)
        d["serve_snapshot"] = list(self.serve_snapshot)
        return d


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


__all__ = ["BRANCH_KEYS", "LORA_MERGE", "MECHANISMS", "POISON_KINDS", "RECOVERY_KEYS", "ExperimentConfig", "Hooks",
           "SplitData", "prepare_data"]
