"""Configuration: the classes (:mod:`.classes`) and the YAML files and ``key=value`` overrides
that fill them (:mod:`.files`)."""
from .classes import (
    CHECKPOINTERS, LORA_MERGE, MECHANISMS, POISON_KINDS, SCHEDULERS, SLICE_END, ExperimentConfig, RayJobConfig, SweepConfig,
)
from .files import build, coerce, load_branches_config, load_sweep_config, parse_overrides, read_yaml
from ..errors import ConfigError

__all__ = ["CHECKPOINTERS", "LORA_MERGE", "MECHANISMS", "POISON_KINDS", "SCHEDULERS", "SLICE_END", "ConfigError",
           "ExperimentConfig", "RayJobConfig", "SweepConfig", "build", "coerce", "load_branches_config", "load_sweep_config",
           "parse_overrides", "read_yaml"]
