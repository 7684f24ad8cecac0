"""The sweep grid without Ray (raybranch.sweep.grid): seeds, grid keys and explicit settings
multiply out, lc is deduplicated, tags are unique run names, trials are paired with the right
full-training baseline, and bad grids are one-line ConfigErrors."""
from __future__ import annotations

import pytest

from raybranch.config import load_sweep_config
from raybranch.errors import ConfigError
from raybranch.ledger.records import check_name
from raybranch.sweep.grid import full_config, full_key, trial_config, trial_grid, trial_tag


def test_seeds_grid_and_settings_multiply_out():
    sweep = load_sweep_config("jobs/configs/sweep.yaml", [
        "seeds=[0,1]", "ranks=[4,8]", "grid={lora_lr: [0.1, 0.2], patience: [1, 2]}",
        "settings=[{lora_init: lora}, {lora_init: svd, lora_lam: 0.5}]"])
    grid = trial_grid(sweep)
    # per split and seed: lc once per patience value (its lora_* knobs dropped) + lc+dlora 2 ranks × 2 lr × 2 patience × 2 settings
    assert len(grid) == 4 * 2 * (2 + 2 * 2 * 2 * 2)
    tags = [trial_tag(p) for p in grid]
    assert len(set(tags)) == len(tags)
    for p in grid:
        cfg = trial_config(dict(sweep.experiment), p, sweep.name)
        check_name("run", cfg.name)
        assert cfg.seed == p["seed"] and cfg.split == p["split"] and cfg.poison == "none"
        assert cfg.patience == p["knobs"]["patience"]
        if p["mechanism"] == "lc+dlora":
            assert cfg.lora_rank == p["rank"] and cfg.lora_lr == p["knobs"]["lora_lr"]
            assert cfg.lora_lam == (0.5 if p["knobs"]["lora_init"] == "svd" else 1.0)
    # baselines: one per split × seed × plain-training knob (patience), not per Delta-LoRA knob
    assert len({full_key(p) for p in grid}) == 4 * 2 * 2
    p = next(p for p in grid if p["mechanism"] == "lc+dlora")
    base = full_config(dict(sweep.experiment), p)
    assert base["seed"] == p["seed"] and base["patience"] == p["knobs"]["patience"] and "lora_init" not in base


def test_shipped_delta_lora_sweep_is_the_size_it_says():
    sweep = load_sweep_config("jobs/configs/sweep-dlora.yaml")
    grid = trial_grid(sweep)
    assert len(grid) == 3 * 3 * 2 * 2 * 4 * 3  # ranks × lrs × B ratios × inits × splits × seeds (its header: 432)
    assert sweep.scheduler == "asha" and sweep.base_experiment().slice_end == "lossy"
    assert len({full_key(p) for p in grid}) == 12
    assert max(len(trial_config(dict(sweep.experiment), p, sweep.name).name) for p in grid) <= 128


@pytest.mark.parametrize("override, match", [
    ("grid={lora_rank: [2, 4]}", "is set by the sweep's own keys"),
    ("grid={seed: [1]}", "is set by the sweep's own keys"),
    ("grid={lora_lrr: [0.1]}", "is not an experiment key"),
    ("grid={lora_lr: []}", "non-empty list"),
    ("grid={lora_lr: [-1]}", "must be > 0"),
    ("grid={lora_init: [pissa]}", "lora_init must be one of"),
    ("settings=[{lora_rank: 3}]", "neither the sweep's own keys nor its grid"),
])
def test_bad_grids_are_config_errors(override, match):
    with pytest.raises(ConfigError, match=match):
        load_sweep_config("jobs/configs/sweep.yaml", [override])
