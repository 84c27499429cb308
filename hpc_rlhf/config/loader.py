"""YAML files + dotted command-line overrides -> a validated, frozen JobConfig.

Every problem is collected before anything fails, so a user fixes a config in one go:
unknown keys (with a "did you mean"), wrong types, constraint violations and cross-field rules.
"""
from __future__ import annotations

import dataclasses
import difflib
import typing
from pathlib import Path
from typing import Any

import yaml

from hpc_rlhf.config.schema import JobConfig

# Fields that existed and were accepted without effect: why they are gone, and what to do.
REMOVED = {
    "launch.rdzv_port": "removed (it was never used); the rendezvous port is derived from the "
                        "job id so jobs sharing a node differ; to choose one, set RDZV_PORT=N "
                        "in the environment you submit from",
}


class ConfigError(ValueError):
    """All problems found in a config, one per line."""

    def __init__(self, errors: list[str], source: str = "config"):
        self.errors = list(errors)
        lines = "\n".join(f"  - {e}" for e in self.errors)
        super().__init__(f"{len(self.errors)} problem(s) in {source}:\n{lines}")


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _all_keys(cls: type = JobConfig, prefix: str = "") -> list[str]:
    keys = []
    for name, hint in _hints(cls).items():
        full = f"{prefix}{name}"
        if dataclasses.is_dataclass(hint):
            keys.extend(_all_keys(hint, full + "."))
        else:
            keys.append(full)
    return keys


def _suggest(key: str, section_keys: list[str]) -> str:
    """' (did you mean X?)': the closest field name, in this section first, else anywhere; for
    an OpenRLHF flag or TRL config name, the field that does its job (config/peers.py)."""
    from hpc_rlhf.config.peers import peer_hint
    hint = peer_hint(key)
    if hint:
        return hint
    leaf = key.rsplit(".", 1)[-1]

    def score(candidate: str) -> float:
        name = candidate.rsplit(".", 1)[-1]
        # Whole name, or its start/end of the same length (typos in 'n_samples', 'lr' ~ 'actor_lr').
        ratio = max(difflib.SequenceMatcher(None, leaf, part).ratio()
                    for part in (name, name[:len(leaf)], name[-len(leaf):]))
        return ratio + (0.05 if candidate in section_keys else 0.0)

    candidates = section_keys + [k for k in _all_keys() if k not in section_keys]
    best = max(candidates, key=score, default=None)
    return f" (did you mean {best}?)" if best is not None and score(best) >= 0.6 else ""


def _coerce(value: Any, hint: Any, name: str, errors: list[str]) -> Any:
    """Check `value` against a field's type; ints widen to floats, lists become tuples."""
    if hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 1e-6 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif hint is str:
        if isinstance(value, str):
            return value
    elif hint is tuple or typing.get_origin(hint) is tuple:
        if isinstance(value, (list, tuple)):
            return tuple(value)
        if isinstance(value, str):
            return (value,)
    else:
        return value
    tname = getattr(hint, "__name__", str(hint))
    errors.append(f"{name}={value!r} has type {type(value).__name__}, expected {tname}; "
                  f"write it as a {tname}" + ("  (quote strings like \"04:00:00\" in YAML)"
                                              if tname == "str" else ""))
    return dataclasses.MISSING


def _bool_choice(cls: type, key: str, value: Any) -> Any:
    """YAML true/false (also yes/no/on/off) for a string field whose choices are
    "auto"/"true"/"false" (train.shared_prompt) -> "true"/"false"."""
    if isinstance(value, bool) and dataclasses.is_dataclass(cls):
        f = next((f for f in dataclasses.fields(cls) if f.name == key), None)
        choices = f.metadata.get("choices") if f is not None else None
        if choices and "true" in choices and "false" in choices:
            return "true" if value else "false"
    return value


def _build(cls: type, data: dict, prefix: str, errors: list[str]) -> Any:
    hints = _hints(cls)
    kwargs = {}
    if not isinstance(data, dict):
        errors.append(f"{prefix.rstrip('.') or 'config'} must be a mapping, got {data!r}")
        return cls()
    section_keys = [f"{prefix}{k}" for k in hints]
    for key, value in data.items():
        full = f"{prefix}{key}"
        if key not in hints:
            errors.append(f"unknown key {full}: {REMOVED[full]}" if full in REMOVED else
                          f"unknown key {full}{_suggest(full, section_keys)}")
            continue
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            kwargs[key] = _build(hint, value if value is not None else {}, full + ".", errors)
        else:
            coerced = _coerce(_bool_choice(cls, key, value), hint, full, errors)
            if coerced is not dataclasses.MISSING:
                kwargs[key] = coerced
    return cls(**kwargs)


def parse_override(text: str) -> tuple[str, Any]:
    """'rollout.n_samples_per_prompt=8' -> ('rollout.n_samples_per_prompt', 8) (YAML-typed)."""
    if "=" not in text:
        raise ConfigError([f"override {text!r} must look like section.field=value"])
    key, raw = text.split("=", 1)
    key = key.strip().lstrip("-")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    # A string field keeps the text as written (YAML would read 04:00:00 as a number).
    hint = _field_hint(key)
    parent, _, name = key.rpartition(".")
    if hint is str and _bool_choice(_field_hint(parent), name, value) is value:
        value = raw  # (a YAML boolean of an auto/true/false field stays one: _build maps it)
    return key, value


def _field_hint(key: str) -> Any:
    cls: Any = JobConfig
    for part in key.split("."):
        hints = _hints(cls) if dataclasses.is_dataclass(cls) else {}
        if part not in hints:
            return None
        cls = hints[part]
    return cls


def merge_overrides(data: dict, overrides: list[str]) -> dict:
    data = {k: (dict(v) if isinstance(v, dict) else v) for k, v in (data or {}).items()}
    for text in overrides:
        key, value = parse_override(text)
        parts = key.split(".")
        node = data
        for part in parts[:-1]:
            child = node.get(part)
            if not isinstance(child, dict):
                child = {}
                node[part] = child
            node = child
        node[parts[-1]] = value
    return data


def config_from_dict(data: dict, source: str = "config") -> JobConfig:
    from hpc_rlhf.config.rules import validate  # rules imports schema only; no cycle at import time

    errors: list[str] = []
    cfg = _build(JobConfig, data or {}, "", errors)
    errors.extend(validate(cfg))  # fields that failed to parse keep their defaults here
    if errors:
        raise ConfigError(errors, source)
    return cfg


def load_config(path: str | Path | None = None, overrides: list[str] | tuple = ()) -> JobConfig:
    """Read YAML at `path` (or the defaults), apply `key=value` overrides, validate."""
    data: dict = {}
    source = "defaults"
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError([f"--config {str(path)!r} does not exist; give a YAML file "
                               "(see configs/)"])
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError([f"{path} is not valid YAML: {e}"]) from None
        source = str(path)
    if list(overrides):
        source += " + overrides"
    return config_from_dict(merge_overrides(data, list(overrides)), source)


def to_dict(cfg: Any) -> dict:
    """Plain nested dict (tuples as lists) for YAML/JSON output."""
    out = {}
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        if dataclasses.is_dataclass(v):
            v = to_dict(v)
        elif isinstance(v, tuple):
            v = list(v)
        out[f.name] = v
    return out


def to_yaml(cfg: Any) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False, default_flow_style=False)
