"""Every config field is read by each trainer it applies to, or refused for it (STYLE rule 11).

hpc_rlhf/config/applies.py declares, per field, the trainers that read it (and any setting it
needs). These tests enumerate the schema, so a field added later without a declaration fails:
- each field has a declaration;
- set away from its default for a trainer outside its declaration (or without the setting it
  needs), `validate` refuses it with a message naming the field;
- for each trainer inside its declaration, the field is read (an attribute access `.name`) in
  the code that trainer imports (its recipe module's import closure, function-level imports
  included, plus the launcher), hpc_rlhf/config/ itself excluded.
"""
from __future__ import annotations

import ast
import dataclasses
import re
from functools import lru_cache
from pathlib import Path

import pytest

from hpc_rlhf.config import JobConfig
from hpc_rlhf.config.applies import APPLIES, schema_fields
from hpc_rlhf.config.rules import validate
from hpc_rlhf.config.schema import TRAINERS

pytestmark = pytest.mark.unit

PKG = Path(__file__).resolve().parents[2] / "hpc_rlhf"
ENTRY = {t: f"hpc_rlhf.recipes.{t}" for t in ("sft", "rm", "prm", "dpo", "kto", "kd", "csft")}
ENTRY.update(rl="hpc_rlhf.recipes.rl.loop",
             rejection_sampling="hpc_rlhf.recipes.rejection_sampling",
             iterative_dpo="hpc_rlhf.recipes.iterative_dpo")
# read by every trainer's job around the recipe (not followed: main dispatches to all recipes)
LAUNCHER = ("launch/main.py", "launch/submit.py", "launch/local.py", "launch/plan.py",
            "launch/sbatch.py", "launch/rundir.py", "runtime/signals.py")


def _file_of(module: str) -> Path | None:
    rel = Path(*module.split(".")[1:])
    for cand in (PKG / rel.with_suffix(".py"), PKG / rel / "__init__.py"):
        if cand.is_file():
            return cand
    return None


def _imports(path: Path, module: str) -> set[str]:
    out = set()
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("hpc_rlhf"))
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            if base.startswith("hpc_rlhf"):
                out.add(base)
                out.update(f"{base}.{a.name}" for a in node.names)
    return out


@lru_cache(maxsize=None)
def closure_text(trainer: str) -> str:
    seen, todo, files = set(), [ENTRY[trainer]], []
    while todo:
        mod = todo.pop()
        path = _file_of(mod)
        if mod in seen or path is None:
            continue
        seen.add(mod)
        files.append(path)
        todo.extend(_imports(path, mod) - seen)
    files += [PKG / f for f in LAUNCHER]
    return "\n".join(p.read_text() for p in set(files)
                     if "config" not in p.relative_to(PKG).parts[:1])


def _other_value(field: dataclasses.Field, default):
    """A valid value != default for the field (its constraints respected)."""
    m = field.metadata
    if m.get("choices"):
        return next(c for c in m["choices"] if c != default)
    if isinstance(default, bool):
        return not default
    if isinstance(default, int):
        return default + 1 if m.get("le") is None and m.get("lt") is None else default - 1
    if isinstance(default, float):
        hi = m.get("le") if m.get("le") is not None else m.get("lt")
        value = default / 2 if default else 0.25
        return value if hi is None or value < hi else default / 2
    if isinstance(default, tuple):
        return ("x_proj",)
    return "x" if default == "" else f"{default}x"


def _cfg(trainer: str, name: str, value) -> JobConfig:
    cfg = JobConfig()
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, trainer=trainer))
    section, field = name.split(".")
    return dataclasses.replace(cfg, **{section: dataclasses.replace(getattr(cfg, section),
                                                                   **{field: value})})


def test_every_field_is_declared():
    names = {n for n, _, _ in schema_fields()}
    assert names - APPLIES.keys() == set(), "declare these in hpc_rlhf/config/applies.py"
    assert APPLIES.keys() - names == set(), "declared but not in the schema"
    for name, use in APPLIES.items():
        assert set(use.trainers) <= set(TRAINERS), name


CASES = [(name, t) for name, _, _ in schema_fields() for t in TRAINERS
         if t not in APPLIES[name].trainers and name != "train.trainer"]


@pytest.mark.parametrize("name,trainer", CASES, ids=[f"{n}-{t}" for n, t in CASES])
def test_field_refused_where_it_is_not_used(name, trainer):
    default, field = next((d, f) for n, d, f in schema_fields() if n == name)
    errs = validate(_cfg(trainer, name, _other_value(field, default)))
    assert any(e.startswith(f"{name}=") or f" {name}=" in e for e in errs), errs


CONDITIONAL = [n for n, u in APPLIES.items() if u.when is not None]


@pytest.mark.parametrize("name", CONDITIONAL)
def test_conditional_field_refused_without_its_setting(name):
    default, field = next((d, f) for n, d, f in schema_fields() if n == name)
    use = APPLIES[name]
    trainer = use.trainers[0]
    cfg = _cfg(trainer, name, _other_value(field, default))
    if use.when(cfg):   # the default config meets the condition (colocated): the other mode
        assert use.when_text == "topology.mode=colocated", use.when_text
        cfg = dataclasses.replace(cfg, topology=dataclasses.replace(cfg.topology,
                                                                    mode="disaggregated"))
    assert not use.when(cfg)
    errs = validate(cfg)
    assert any(name in e and use.when_text in e for e in errs), errs


READS = [(name, t) for name, use in APPLIES.items() for t in use.trainers]


@pytest.mark.parametrize("name,trainer", READS, ids=[f"{n}-{t}" for n, t in READS])
def test_field_read_by_each_trainer_it_applies_to(name, trainer):
    field = name.split(".")[1]
    if name in ("launch.partition", "launch.account", "launch.qos"):
        pattern = rf'"{field}"'   # submit.py reads these three with getattr(cfg.launch, key)
    else:
        pattern = rf"\.{field}\b"
    assert re.search(pattern, closure_text(trainer)), (
        f"{name} is declared for train.trainer={trainer!r}, but nothing that trainer imports "
        f"reads it; wire it or drop {trainer!r} from its declaration in config/applies.py")


def test_closures_tell_trainers_apart():
    """The read check has teeth: a trainer's own fields are not all over the others' code."""
    assert not re.search(r"\.kto_desirable_weight\b", closure_text("sft"))
    assert not re.search(r"\.prm_step_tag\b", closure_text("dpo"))
    assert not re.search(r"\.teacher_path\b", closure_text("rm"))
