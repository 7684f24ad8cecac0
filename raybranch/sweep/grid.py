"""A sweep's trials (Ray-free): the grid, each trial's tag and ExperimentConfig, and which
trials share one full-training baseline.

Grid (:func:`trial_grid`): every combination of the config's ``splits``, ``seeds``, ``bits``,
``snapshot_every``, ``mechanisms``, the values of every ``grid`` key (ExperimentConfig keys,
e.g. ``lora_lr: [0.1, 0.2]``), each of the explicit ``settings`` (dicts of such keys; none:
one empty setting), and for ``lc+dlora`` every ``ranks`` value. ``lc`` has no rank
and no Delta-LoRA knob: with ``dedupe_lc`` it runs once per combination of the rest (rank
"–", its ``lora_*`` grid values dropped).

The paired baseline of a trial, ``acc_full``, is the same schedule trained without raybranch
(plain model, no Delta-LoRA). It depends on the split, the seed and the grid keys that change
plain training (:func:`full_key`): not on the codec, the slice-end policy or any ``lora_*`` key.
"""
from __future__ import annotations

import hashlib
import itertools
import re

from ..config.classes import ExperimentConfig, SweepConfig
from ..config.files import build
from ..config.lora_defaults import with_model_defaults

# ExperimentConfig keys that do not change plain training (the full-training baseline).
CODEC_KEYS = frozenset({"bits", "snapshot_every", "slice_end", "codec", "residual", "granularity", "segment_size",
                        "flush_every", "serve_snapshot", "settle", "mechanisms", "checkpoint_every"})


def plain_neutral(key: str) -> bool:
    """Whether an experiment key leaves plain training (no raybranch, no Delta-LoRA) unchanged."""
    return key.startswith("lora_") or key in CODEC_KEYS


def trial_grid(sweep: SweepConfig) -> list[dict]:
    """Every trial's parameters: split, seed, bits, snapshot_every, mechanism, rank (None for lc
    when deduped) and ``knobs`` (the trial's values of the ``grid`` keys)."""
    keys = list(sweep.grid)
    product = [dict(zip(keys, vals)) for vals in itertools.product(*(sweep.grid[k] for k in keys))]
    combos = [{**s, **c} for s in (sweep.settings or [{}]) for c in product]
    seeds = list(sweep.seeds) or [None]
    grid, seen = [], set()
    for split in sweep.splits:
        for seed in seeds:
            for bits in sweep.bits:
                for snap in sweep.snapshot_every:
                    for mech in sweep.mechanisms:
                        ranks = [None] if mech == "lc" and sweep.dedupe_lc else list(sweep.ranks)
                        for knobs in combos:
                            if mech == "lc" and sweep.dedupe_lc:
                                knobs = {k: v for k, v in knobs.items() if not k.startswith("lora_")}
                            for r in ranks:
                                p = {"split": split, "seed": seed, "bits": bits, "snapshot_every": snap,
                                     "mechanism": mech, "rank": r, "knobs": knobs}
                                tag = trial_tag(p)
                                if tag not in seen:
                                    seen.add(tag)
                                    grid.append(p)
    return grid


def _value_tag(v) -> str:
    text = "none" if v is None else str(v).lower()
    return re.sub(r"[^A-Za-z0-9.]+", "-", text).strip("-") or "x"


def knob_label(knobs: dict) -> str:
    """``lr=0.2 b_ratio=4`` for ``{"lora_lr": 0.2, "lora_b_ratio": 4}`` (``lora_`` dropped)."""
    return " ".join(f"{k.removeprefix('lora_')}={v}" for k, v in knobs.items())


def trial_tag(p: dict) -> str:
    """A run-name-safe tag of a trial's parameters, e.g. ``4x25-lc-dlora-r8-b3-snone-seed1-lr0.2``
    (a hash replaces the knob part past 128 characters)."""
    split = p["split"].replace("/", "-").replace("%", "").replace(" ", "")
    rank = "" if p["rank"] is None else f"-r{p['rank']}"
    seed = "" if p.get("seed") is None else f"-seed{p['seed']}"
    knobs = "".join(f"-{k.removeprefix('lora_').replace('_', '')}{_value_tag(v)}" for k, v in (p.get("knobs") or {}).items())
    tag = f"{split}-{p['mechanism'].replace('+', '-')}{rank}-b{p['bits']}-s{p['snapshot_every'] or 'none'}{seed}"
    if len(tag + knobs) > 100:
        knobs = "-k" + hashlib.sha256(knobs.encode()).hexdigest()[:10]
    return tag + knobs


def trial_config(base: dict, p: dict, name: str) -> ExperimentConfig:
    """The ExperimentConfig of one trial: the base, the trial's parameters, no poison; Delta-LoRA
    keys neither sets come from the model's defaults."""
    d = {**base, **(p.get("knobs") or {}), "split": p["split"], "bits": p["bits"], "snapshot_every": p["snapshot_every"],
         "mechanisms": [p["mechanism"]], "poison": "none", "name": f"{name}-{trial_tag(p)}"}
    if p.get("seed") is not None:
        d["seed"] = p["seed"]
    if p["rank"] is not None:
        d["lora_rank"] = p["rank"]
    cfg = build(ExperimentConfig, with_model_defaults(d), where=f"sweep trial {trial_tag(p)}")
    cfg.validate()
    return cfg


def full_key(p: dict) -> str:
    """The baseline a trial is paired with: split, seed and the knobs that change plain training."""
    plain = {k: v for k, v in (p.get("knobs") or {}).items() if not plain_neutral(k)}
    return "|".join([p["split"], str(p.get("seed")), knob_label(plain)])


def full_config(base: dict, p: dict) -> dict:
    """The experiment dict of a trial's full-training baseline (see :func:`full_key`)."""
    d = {**base, **{k: v for k, v in (p.get("knobs") or {}).items() if not plain_neutral(k)},
         "split": p["split"], "poison": "none"}
    if p.get("seed") is not None:
        d["seed"] = p["seed"]
    return with_model_defaults(d)


__all__ = ["CODEC_KEYS", "full_config", "full_key", "knob_label", "plain_neutral", "trial_config", "trial_grid", "trial_tag"]
