"""Per-model Delta-LoRA defaults (raybranch/config/lora_defaults.yaml) reach every config built
from user input — branches configs, overrides, sweep trials — unless the input sets the key;
run.json records the resolved values; a bad defaults file is a one-line ConfigError."""
from __future__ import annotations

import dataclasses

import pytest

from raybranch.config import load_branches_config, load_sweep_config
from raybranch.config.classes import ExperimentConfig
from raybranch.config.lora_defaults import DEFAULTS_FILE, load_defaults, model_defaults, with_model_defaults
from raybranch.errors import ConfigError
from raybranch.sweep.grid import trial_config, trial_grid

LORA_KEYS = {f.name for f in dataclasses.fields(ExperimentConfig) if f.name.startswith("lora_")}


def test_the_shipped_file_covers_the_models_the_issue_names():
    doc = load_defaults()
    assert {"*", "lenet5", "alexnet-small", "vit-tiny"} <= set(doc)
    for model, keys in doc.items():
        assert set(keys) <= LORA_KEYS, model
    assert model_defaults("a-model-not-listed") == doc["*"]


@pytest.mark.parametrize("model", ["lenet5", "alexnet-small", "vit-tiny"])
def test_branches_config_gets_its_models_defaults(model):
    cfg, _ = load_branches_config(None, [f"model={model}"])
    want = model_defaults(model)
    assert want and {k: getattr(cfg, k) for k in want} == want
    # a key the input sets wins over the model's default
    cfg2, _ = load_branches_config(None, [f"model={model}", "lora_lr=0.0123"])
    assert cfg2.lora_lr == 0.0123 and cfg2.lora_pattern == want.get("lora_pattern", cfg.lora_pattern)
    # run.json's dict holds the resolved values: reading it back changes nothing
    assert ExperimentConfig.from_dict(cfg.as_dict()) == cfg


def test_configs_built_in_code_get_them_too():
    assert ExperimentConfig().lora_lr == model_defaults("lenet5")["lora_lr"]  # the demo's config
    cfg = ExperimentConfig(model="alexnet-small", lora_rank=16)
    assert cfg.lora_pattern == model_defaults("alexnet-small")["lora_pattern"] and cfg.lora_rank == 16
    unset = [f.name for f in dataclasses.fields(ExperimentConfig) if f.name.startswith("lora_") and f.default is None
             and f.name not in ("lora_alpha", "lora_dense_lr", "lora_clip")]
    assert set(unset) <= set(load_defaults()["*"])  # every key left None has a default for every model


def test_sweep_trials_resolve_defaults_per_model():
    sweep = load_sweep_config("jobs/configs/sweep-quick.yaml", ["mechanisms=[lc+dlora]", "grid={model: [lenet5, alexnet-small]}"])
    cfgs = {c.model: c for c in (trial_config(dict(sweep.experiment), p, "q") for p in trial_grid(sweep))}
    for model, cfg in cfgs.items():
        for k, v in model_defaults(model).items():
            if k != "lora_rank":  # the sweep's ranks set it
                assert getattr(cfg, k) == v, (model, k)


def test_bad_defaults_file_is_a_config_error(tmp_path):
    bad = tmp_path / "d.yaml"
    bad.write_text("lenet5: {lora_lr: 0.1, lr: 0.5}\n")
    with pytest.raises(ConfigError, match=r"model 'lenet5' sets \['lr'\], which are not Delta-LoRA keys"):
        load_defaults(str(bad))
    bad.write_text("- a list\n")
    with pytest.raises(ConfigError, match="needs a mapping"):
        load_defaults(str(bad))
    assert with_model_defaults({"model": "lenet5", "lora_rank": 3}, str(DEFAULTS_FILE))["lora_rank"] == 3
