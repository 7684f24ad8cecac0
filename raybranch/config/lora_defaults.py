"""Per-model Delta-LoRA defaults, read from ``lora_defaults.yaml`` next to this module.

A config (YAML file, overrides, a sweep trial) that leaves a ``lora_*`` key out gets the value
its model's entry gives (else the ``"*"`` entry's, else the ExperimentConfig field default).
The defaults are filled in when a config is built from user input, so ``run.json`` records the
values a run trained with and a later change of this file does not change old runs.
"""
from __future__ import annotations

import dataclasses
import functools
from pathlib import Path

import yaml

from ..errors import ConfigError

DEFAULTS_FILE = Path(__file__).with_name("lora_defaults.yaml")


@functools.lru_cache(maxsize=4)
def load_defaults(path: str = str(DEFAULTS_FILE)) -> dict[str, dict]:
    """{model or "*": {lora_* key: value}} from the YAML file; unknown keys are a ConfigError."""
    from .classes import ExperimentConfig

    doc = yaml.safe_load(Path(path).read_text()) or {}
    known = {f.name for f in dataclasses.fields(ExperimentConfig) if f.name.startswith("lora_")}
    if not isinstance(doc, dict) or not all(isinstance(v, dict) for v in doc.values()):
        raise ConfigError(f"{path}: needs a mapping of model → {{lora_* key: value}}")
    for model, keys in doc.items():
        bad = sorted(set(keys) - known)
        if bad:
            raise ConfigError(f"{path}: model {model!r} sets {bad}, which are not Delta-LoRA keys ({sorted(known)})")
    return doc


def model_defaults(model: str, path: str = str(DEFAULTS_FILE)) -> dict:
    """The Delta-LoRA defaults of ``model``: the "*" entry overlaid with the model's own."""
    doc = load_defaults(path)
    return {**doc.get("*", {}), **doc.get(model, {})}


def with_model_defaults(values: dict, path: str = str(DEFAULTS_FILE)) -> dict:
    """``values`` with every ``lora_*`` key it lacks taken from its model's defaults
    (the model is ``values["model"]``, else the ExperimentConfig default)."""
    from .classes import ExperimentConfig

    model = values.get("model", ExperimentConfig.model)
    return {**model_defaults(str(model), path), **values}


__all__ = ["DEFAULTS_FILE", "load_defaults", "model_defaults", "with_model_defaults"]
