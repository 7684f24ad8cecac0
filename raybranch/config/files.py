"""Job configs: a YAML file of flat ``key: value`` pairs plus ``key=value`` overrides (torchtune
style), coerced to the types of the dataclasses they fill.

    cfg, job = load_branches_config("jobs/configs/quick.yaml", ["epochs=2", "store=s3://b/p"])
    sweep = load_sweep_config("jobs/configs/sweep-quick.yaml", ["ranks=[1,2]"])

A branches config fills two dataclasses (:mod:`.classes`): :class:`~.classes.ExperimentConfig`
(every knob of the experiment) and :class:`RayJobConfig` (where it runs and writes: ``store``,
``out``, Ray Train settings). A sweep config fills :class:`SweepConfig`, whose ``experiment``
mapping holds the ExperimentConfig keys every trial starts from. Keys are the dataclass field
names; an unknown key is a one-line :class:`ConfigError` naming it, where it came from and the
closest known key.

Overrides ``key=value``: the value is read for the field's type — ``int`` (``3``), ``float``
(``0.05``, ``1e-3``), ``bool`` (true/false/yes/no/on/off/1/0), ``str`` (taken as written),
``X | None`` (``null``/``none``/``~`` or empty → None), tuples (``a,b`` or a YAML list
``[a, b]``). ``experiment.KEY=value`` sets a key of a sweep's base experiment. A later override
of a key wins.
"""
from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from ..errors import ConfigError, RaybranchError
from .classes import ExperimentConfig, RayJobConfig, SweepConfig
from .lora_defaults import with_model_defaults

# -- reading ------------------------------------------------------------------------------------
def read_yaml(path: str | os.PathLike) -> dict:
    """The mapping in a YAML file (an empty file is an empty mapping)."""
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read config {str(p)!r}: {exc.strerror or exc}") from None
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"config {str(p)!r} is not valid YAML{at}: {getattr(exc, 'problem', None) or exc}") from None
    if doc is None:
        return {}
    if not isinstance(doc, dict):
        raise ConfigError(f"config {str(p)!r} must be a mapping of key: value, got a {type(doc).__name__}")
    return doc


def parse_overrides(items: list[str]) -> dict[str, str]:
    """``["a=1", "b=x"]`` → ``{"a": "1", "b": "x"}`` (values stay text until coerced)."""
    out: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r} is not key=value")
        out[key.strip()] = value.strip()
    return out


def _field_types(cls) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _unknown(key: str, known: list[str], where: str) -> ConfigError:
    close = difflib.get_close_matches(key, known, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else f"; known keys: {', '.join(sorted(known))}"
    return ConfigError(f"unknown config key {key!r} ({where}){hint}")


_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}
_NONE = {"", "null", "none", "~"}


def coerce(value: Any, tp: Any, key: str, text: bool = False) -> Any:
    """``value`` as type ``tp`` (``text``: it is an override's raw string)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None or (text and isinstance(value, str) and value.strip().lower() in _NONE):
            return None
        return coerce(value, args[0], key, text)
    if origin is tuple:
        (inner, *_rest) = typing.get_args(tp)
        if text and isinstance(value, str):
            s = value.strip()
            if s.startswith("["):
                value = _yaml_value(s, key)
                text = False
            else:
                value = [v for v in (p.strip() for p in s.split(",")) if v != ""]
        if isinstance(value, (str, int, float)) and not isinstance(value, bool) or value is None:
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key {key!r} needs a list, got {value!r}")
        return tuple(coerce(v, inner, key, text) for v in value)
    if tp is dict:
        if text and isinstance(value, str):
            value = _yaml_value(value, key)
        if not isinstance(value, dict):
            raise ConfigError(f"config key {key!r} needs a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, (str, int)) and str(value).strip().lower() in _TRUE | _FALSE:
            return str(value).strip().lower() in _TRUE
        raise ConfigError(f"config key {key!r} needs true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value.strip())
            except ValueError:
                pass
        raise ConfigError(f"config key {key!r} needs an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value.strip())
            except ValueError:
                pass
        raise ConfigError(f"config key {key!r} needs a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"config key {key!r} needs a string, got {value!r}")
    raise ConfigError(f"config key {key!r} has a type raybranch cannot read from a config ({tp})")


def _yaml_value(s: str, key: str) -> Any:
    try:
        return yaml.safe_load(s)
    except yaml.YAMLError:
        raise ConfigError(f"override {key}={s!r} is not a valid YAML value") from None


def build(cls, values: dict, where: str, text_keys: set[str] = frozenset()):
    """``cls(**values)`` with each value coerced to its field's type; unknown keys are errors."""
    types_ = _field_types(cls)
    kwargs = {}
    for key, value in values.items():
        if key not in types_:
            raise _unknown(str(key), list(types_), where)
        kwargs[key] = coerce(value, types_[key], key, text=key in text_keys)
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise ConfigError(f"{where}: {exc}") from None


def _merge(path: str | os.PathLike | None, overrides: list[str] | None) -> tuple[dict, set[str], str]:
    values = read_yaml(path) if path is not None else {}
    where = f"in {path}" if path is not None else "in the overrides"
    ov = parse_overrides(list(overrides or []))
    values = {**values, **ov}
    return values, set(ov), where


def load_branches_config(path: str | os.PathLike | None, overrides: list[str] | None = None) -> tuple[ExperimentConfig, RayJobConfig]:
    """(experiment config, job config) from a YAML file and ``key=value`` overrides."""
    values, text_keys, where = _merge(path, overrides)
    exp_keys = set(_field_types(ExperimentConfig))
    job_keys = set(_field_types(RayJobConfig))
    for key in values:
        if key not in exp_keys | job_keys:
            raise _unknown(str(key), sorted(exp_keys | job_keys), where if key not in text_keys else "in the overrides")
    exp = build(ExperimentConfig, with_model_defaults({k: v for k, v in values.items() if k in exp_keys}), where, text_keys)
    job = build(RayJobConfig, {k: v for k, v in values.items() if k in job_keys}, where, text_keys)
    try:
        exp.validate()
    except RaybranchError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    job.validate()
    return exp, job


def load_sweep_config(path: str | os.PathLike | None, overrides: list[str] | None = None) -> SweepConfig:
    """A :class:`SweepConfig` from a YAML file and overrides (``experiment.KEY=value`` reaches
    the base experiment)."""
    values, text_keys, where = _merge(path, overrides)
    exp_over = {k.split(".", 1)[1]: v for k, v in values.items() if k.startswith("experiment.")}
    values = {k: v for k, v in values.items() if not k.startswith("experiment.")}
    exp_types = _field_types(ExperimentConfig)
    base = dict(values.get("experiment") or {})
    for k, v in exp_over.items():
        if k not in exp_types:
            raise _unknown(k, list(exp_types), "in the overrides, under experiment.")
        base[k] = coerce(v, exp_types[k], k, text=True)
    if base or "experiment" in values:
        values["experiment"] = base
    text_keys = text_keys - {"experiment"}
    cfg = build(SweepConfig, values, where, text_keys)
    cfg.validate()
    return cfg


__all__ = ["build", "coerce", "load_branches_config", "load_sweep_config", "parse_overrides", "read_yaml"]
