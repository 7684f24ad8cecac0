"""Every configuration class of raybranch, in one place (no YAML here: :mod:`.files` reads them).

- :class:`ExperimentConfig`: a run's model, data, slicing, seeds, optimiser, codec and Delta-LoRA
  settings; written into the store as a run's ``run.json`` (:mod:`raybranch.runs.spec`) and the
  input of the demo, the jobs and every sweep trial;
- :class:`RayJobConfig`: where a branching job runs and writes (store, Ray Train settings);
- :class:`SweepConfig`: a Ray Tune grid over experiments.

The classes validate themselves (``validate()``: a one-line :class:`~raybranch.errors.ConfigError`
or :class:`~raybranch.errors.RaybranchError` naming the bad value).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ..data import split_spec
from ..errors import ConfigError, RaybranchError

MECHANISMS = ("lc", "lc+dlora")
SLICE_END = ("exact", "lossy")
LORA_MERGE = ("none", "slice-end")
LORA_INITS = ("lora", "svd")
POISON_KINDS = ("backdoor", "flip", "none")
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
    lora_lr: float | None = None       # SGD lr of the factors A (and B: × lora_b_ratio) of the Delta-LoRA models (None: the model's default)
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
    # Delta-LoRA knobs (docs/DELTA_LORA.md). A config file or override that leaves one out, and a
    # None here, gets its model's default from raybranch/config/lora_defaults.yaml (:mod:`.lora_defaults`).
    lora_pattern: str | None = None    # a preset of raybranch.lora.PRESETS (classifier, linear, conv, all, vit-*) or a regex
    lora_rank: int | None = None
    lora_scale: float | None = None    # s in h = W x + s·B A x, unless lora_alpha is set
    lora_alpha: float | None = None    # s = α/r (peft), or α/√r with lora_rslora (rsLoRA)
    lora_rslora: bool = False
    lora_lam: float = 1.0              # λ in W ← W + λ·s·(B'A' − BA)
    lora_init: str = "lora"            # lora (kaiming A, B = 0) | svd (the branch point's warm-up update, folded out)
    lora_b_ratio: float = 1.0          # LoRA+: B's lr = lora_b_ratio × lora_lr
    lora_dense_lr: float | None = None # lr of the parameters with no adapter (None: lora_lr)
    lora_train_bias: bool = False      # the adapted layers' biases train (at lora_dense_lr) or stay frozen
    lora_min_saving: float | None = None  # adapt a matched layer only if its factors hold this many times fewer numbers than W
    lora_clip: float | None = None     # clip a Delta-LoRA model's gradient norm to this before each step (None: no clipping)
    lora_merge: str = "none"           # none | slice-end (merge & re-initialise A, B)
    compare_lora_merge: bool = False   # also run main with the other merge policy, record both

    def __post_init__(self) -> None:
        """Delta-LoRA keys left None take the model's defaults (:mod:`.lora_defaults`), so a config
        built in code trains like one read from a file; run.json then records the values."""
        from .lora_defaults import model_defaults

        for key, value in model_defaults(self.model).items():
            if getattr(self, key) is None:
                setattr(self, key, value)

    def checkpointer_kwargs(self) -> dict:
        """The Checkpointer settings every branch of the experiment uses."""
        return dict(codec=self.codec, residual=self.residual, bits=self.bits, granularity=self.granularity,
                    snapshot_every=self.snapshot_every, segment_size=self.segment_size, flush_every=self.flush_every,
                    save_rng=False)  # batch order is seeded, not global RNG

    def exact_slice_end(self, mech: str, branch: str) -> bool:
        """Whether ``branch``'s slice ends are exact key frames (all of them with slice_end="exact";
        otherwise the clean branch's of the ``serve_snapshot`` mechanisms, which are served)."""
        return self.slice_end == "exact" or (mech in self.serve_snapshot and branch == "clean")

    def lora_s(self) -> float:
        """The scale s of the Delta-LoRA layers: lora_scale, or α/r (α/√r with lora_rslora)."""
        if self.lora_alpha is None:
            return self.lora_scale
        return self.lora_alpha / (self.lora_rank ** 0.5 if self.lora_rslora else self.lora_rank)

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
        if self.lora_init not in LORA_INITS:
            raise RaybranchError(f"lora_init must be one of {LORA_INITS}, got {self.lora_init!r}")
        lrs = {"lora_lr": self.lora_lr, "lora_b_ratio": self.lora_b_ratio, "lora_dense_lr": self.lora_dense_lr,
               "lora_rank": self.lora_rank, "lora_alpha": self.lora_alpha, "lora_min_saving": self.lora_min_saving, "lora_clip": self.lora_clip}
        bad = {k: v for k, v in lrs.items() if v is not None and not v > 0}
        if bad or self.lora_s() == 0:
            raise RaybranchError(f"Delta-LoRA rates, rank and scale must be > 0, got {bad or {'lora_scale': self.lora_s()}}")
        if self.lora_merge not in LORA_MERGE:
            raise RaybranchError(f"lora_merge must be one of {LORA_MERGE}, got {self.lora_merge!r}")

    @classmethod
    def quick(cls, **overrides) -> "ExperimentConfig":
        """The ``--quick`` demo: fewer epochs and a shorter patience."""
        return cls(**{"epochs": 8, "patience": 2, "branch_point_max_epochs": 20, **overrides})

    def as_dict(self) -> dict:
        """JSON-ready (tuples as lists); :meth:`from_dict` reads it back."""
        d = dataclasses.asdict(self)
        d["mechanisms"] = list(self.mechanisms)
        d["serve_snapshot"] = list(self.serve_snapshot)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ExperimentConfig":
        """The config of :meth:`as_dict` (lists back to tuples); an unknown key is a ConfigError."""
        known = {f.name for f in dataclasses.fields(cls)}
        bad = sorted(set(d) - known)
        if bad:
            raise ConfigError(f"unknown experiment config key(s) {bad}")
        d = dict(d)
        for k in ("mechanisms", "serve_snapshot"):
            if k in d:
                d[k] = tuple(d[k])
        return cls(**d)


def _checked(cfg: ExperimentConfig, where: str) -> None:
    """``cfg.validate()``, its error as a ConfigError naming ``where``."""
    try:
        cfg.validate()
    except RaybranchError as exc:
        raise ConfigError(f"{where}: {exc}") from None


CHECKPOINTERS = ("sync", "async")
SCHEDULERS = ("none", "asha")



@dataclass
class RayJobConfig:
    """Where a branching job runs and writes (the keys of a branches config that are not the
    experiment's)."""

    store: str | None = None           # checkpoint store URI; None: $RAYBRANCH_STORE, else file://<out>/store
    out: str = "out/branches"          # report directory (report.json, report.md, plots), on the driver's node
    num_workers: int = 1               # Ray Train workers per branch: > 1 trains it data-parallel (DDP), each rank writing its part
    use_gpu: bool | None = None        # None: whether the cluster has GPUs
    cpus_per_worker: float = 1.0
    worker_resources: dict = dataclasses.field(default_factory=dict)  # more Ray resources per worker, e.g. {branch_node: 1} to place branches on the nodes offering it
    max_failures: int = 1              # FailureConfig: worker-group restarts per branch
    checkpointer: str = "sync"         # sync: Checkpointer in the worker (pipeline thread) | async: AsyncCheckpointer (checkpoint actor)
    parallel: bool = True              # main and clean at once (False: one after the other)

    def validate(self) -> None:
        if not isinstance(self.num_workers, int) or self.num_workers < 1:
            raise ConfigError(f"num_workers must be a positive number of Ray Train workers per branch, got {self.num_workers!r}")
        if self.num_workers > 1 and self.checkpointer != "sync":
            raise ConfigError(f"checkpointer={self.checkpointer!r} needs num_workers=1: data-parallel ranks each write their "
                              "part with the sync Checkpointer")
        if self.max_failures < 0 or self.cpus_per_worker <= 0:
            raise ConfigError(f"max_failures must be ≥ 0 and cpus_per_worker > 0, got {self.max_failures}, {self.cpus_per_worker}")
        if self.checkpointer not in CHECKPOINTERS:
            raise ConfigError(f"checkpointer must be one of {CHECKPOINTERS}, got {self.checkpointer!r}")
        bad = {k: v for k, v in self.worker_resources.items() if k in ("CPU", "GPU") or not isinstance(v, (int, float)) or v <= 0}
        if bad:
            raise ConfigError(f"worker_resources must map custom resource names (not CPU/GPU: cpus_per_worker, use_gpu) "
                              f"to amounts > 0, got {bad}")


@dataclass
class SweepConfig:
    """A Ray Tune grid over split × seed × LoRA rank × bits × snapshot policy × mechanism × the
    ``grid`` keys (any other ExperimentConfig keys, e.g. ``lora_lr: [0.1, 0.2]``).

    Each trial trains ``main`` (no poison) of one mechanism from the branch point on the split's
    slices, in a run of its own (``<name>-<trial tag>``). ``lc`` does not depend on the LoRA
    rank: with ``dedupe_lc`` it runs once per (split, bits, snapshot) instead of once per rank.
    """

    name: str = "sweep"
    store: str | None = None             # None: $RAYBRANCH_STORE, else file://<out>/store
    out: str = "out/sweep"               # results.csv, results.md, ratio_vs_accuracy.png
    splits: tuple[str, ...] = ("4x25", "20x5", "80x1.25", "70/10/10/10")
    ranks: tuple[int, ...] = (1, 2, 4, 8, 16)
    bits: tuple[int, ...] = (3,)
    snapshot_every: tuple[int | None, ...] = (None,)  # exact key frame every N checkpoints (None: the Checkpointer default)
    mechanisms: tuple[str, ...] = ("lc", "lc+dlora")
    dedupe_lc: bool = True
    scheduler: str = "none"              # none | asha (stops trials whose accuracy lags, by share of data trained)
    asha_grace_percent: float = 25.0     # ASHA: no trial stops before this share (%) of its slices
    asha_reduction_factor: float = 2.0
    seeds: tuple[int, ...] = ()          # every trial once per seed (empty: the experiment's seed only)
    grid: dict = dataclasses.field(default_factory=dict)  # more ExperimentConfig keys → lists of values, every combination
    settings: tuple[dict, ...] = ()      # explicit combinations of ExperimentConfig keys, each crossed with the grid
    max_concurrent: int = 2              # trials at once
    cpus_per_trial: float = 1.0
    experiment: dict = dataclasses.field(default_factory=dict)  # ExperimentConfig keys every trial starts from

    def validate(self) -> None:
        if self.scheduler not in SCHEDULERS:
            raise ConfigError(f"scheduler must be one of {SCHEDULERS}, got {self.scheduler!r}")
        for key in ("splits", "ranks", "bits", "snapshot_every", "mechanisms"):
            if not getattr(self, key):
                raise ConfigError(f"sweep key {key!r} needs at least one value")
        bad = [m for m in self.mechanisms if m not in MECHANISMS]
        if bad:
            raise ConfigError(f"sweep mechanisms must be among {MECHANISMS}, got {bad}")
        for s in self.splits:
            split_spec(s)
        if min(self.ranks) < 1 or not all(1 <= b <= 8 for b in self.bits):
            raise ConfigError(f"ranks must be ≥ 1 and bits in 1..8, got {list(self.ranks)}, {list(self.bits)}")
        if any(s is not None and s < 1 for s in self.snapshot_every):
            raise ConfigError(f"snapshot_every values must be ≥ 1 or null, got {list(self.snapshot_every)}")
        if self.max_concurrent < 1 or self.cpus_per_trial <= 0:
            raise ConfigError(f"max_concurrent must be ≥ 1 and cpus_per_trial > 0, got {self.max_concurrent}, {self.cpus_per_trial}")
        if self.asha_grace_percent <= 0 or self.asha_reduction_factor <= 1:
            raise ConfigError(f"asha_grace_percent must be > 0 and asha_reduction_factor > 1, got {self.asha_grace_percent}, {self.asha_reduction_factor}")
        self.base_experiment()  # unknown or ill-typed experiment keys fail here
        self.check_grid()

    def check_grid(self) -> None:
        """``grid`` keys are ExperimentConfig keys the sweep does not set itself, each with a
        non-empty list of values of the key's type (ConfigError otherwise)."""
        from .files import build

        own = {"split", "seed", "bits", "snapshot_every", "mechanisms", "lora_rank", "name", "poison"}
        fields = {f.name for f in dataclasses.fields(ExperimentConfig)}
        for key, values in self.grid.items():
            if key in own or key not in fields:
                why = "is set by the sweep's own keys (splits, seeds, bits, snapshot_every, mechanisms, ranks)" \
                    if key in own else "is not an experiment key"
                raise ConfigError(f"sweep grid key {key!r} {why}")
            if not isinstance(values, (list, tuple)) or not values:
                raise ConfigError(f"sweep grid key {key!r} needs a non-empty list of values, got {values!r}")
            for v in values:
                _checked(build(ExperimentConfig, {**self.experiment, key: v}, where=f"sweep grid value {key}={v!r}"),
                         f"sweep grid value {key}={v!r}")
        for i, setting in enumerate(self.settings):
            bad = sorted(set(setting) & (own | set(self.grid)) or set(setting) - fields)
            if bad or not setting:
                raise ConfigError(f"sweep setting {i + 1} ({setting!r}) needs experiment keys that neither the sweep's own keys "
                                  f"nor its grid set; {bad or 'it is empty'}")
            _checked(build(ExperimentConfig, {**self.experiment, **setting}, where=f"sweep setting {i + 1}"),
                     f"sweep setting {i + 1}")

    def base_experiment(self) -> ExperimentConfig:
        """The ExperimentConfig every trial starts from (``experiment`` keys, coerced, with the
        model's Delta-LoRA defaults for the keys it leaves out)."""
        from .files import build
        from .lora_defaults import with_model_defaults

        return build(ExperimentConfig, with_model_defaults(self.experiment), where="sweep key 'experiment'")


__all__ = ["CHECKPOINTERS", "LORA_INITS", "LORA_MERGE", "MECHANISMS", "POISON_KINDS", "SCHEDULERS",
           "SLICE_END", "ExperimentConfig", "RayJobConfig", "SweepConfig"]
