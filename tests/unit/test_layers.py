"""The package layers of shared/DESIGN.md section 6, read from the source (every import
statement, the lazy ones inside functions included):

    config -> topology -> parts -> runtime -> recipes -> launch

Imports only go down. Parts may import each other, but never in a cycle. algos is pure math:
torch and the standard library only. `__main__` modules are command entry points and sit on
top (python -m hpc_rlhf.config runs the launcher's preflight).
"""
import ast
import sys
from collections import defaultdict
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

PKG = Path(__file__).resolve().parents[2] / "hpc_rlhf"
PARTS = ("engine", "models", "rollout", "weight_sync", "rewards", "data", "ring_attn",
         "checkpoint", "metrics", "algos")
LAYER = {"config": 0, "faults": 0, "topology": 1, **{p: 2 for p in PARTS}, "runtime": 3,
         "recipes": 4, "launch": 5, "submit": 5}


def _imports(name: str, is_pkg: bool, source: str) -> list[tuple[str, int]]:
    """(imported module or module.attribute, line) of every import in `source`."""
    here = name.split(".") if is_pkg else name.split(".")[:-1]
    out = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(here[:len(here) - node.level + 1] + ([base] if base else []))
            out.append((base, node.lineno))
            out += [(f"{base}.{a.name}", node.lineno) for a in node.names]
    return out


def _modules():
    """{module name: (its package under hpc_rlhf, [(imported module, line)])}."""
    out = {}
    for path in sorted(PKG.rglob("*.py")):
        parts = list(path.relative_to(PKG.parent).with_suffix("").parts)
        is_pkg = parts[-1] == "__init__"
        name = ".".join(parts[:-1] if is_pkg else parts)
        out[name] = (_package(name), _imports(name, is_pkg, path.read_text()))
    return out


def _package(module: str) -> str:
    return module.split(".")[1] if module.startswith("hpc_rlhf.") else ""


def _upward(modules) -> list[str]:
    found = []
    for name, (top, imports) in modules.items():
        if not top or name.endswith(".__main__"):
            continue
        for target, line in imports:
            other = _package(target)
            if other and other != top and LAYER.get(other, 0) > LAYER[top]:
                found.append(f"{name}:{line} imports {target} ({top} is layer {LAYER[top]}, "
                             f"{other} is layer {LAYER[other]})")
    return sorted(set(found))


MODULES = _modules()


def test_every_package_has_a_layer():
    missing = sorted({top for top, _ in MODULES.values() if top and top not in LAYER})
    assert not missing, f"place {missing} in LAYER (and in shared/DESIGN.md's layout)"


def test_imports_only_go_down():
    upward = _upward(MODULES)
    assert not upward, "\n".join(upward)


def test_parts_import_each_other_without_cycles():
    graph = defaultdict(set)
    for name, (top, imports) in MODULES.items():
        for target, _ in imports:
            other = _package(target)
            if top in PARTS and other in PARTS and other != top:
                graph[top].add(other)
    cycles = []

    def visit(node, path):
        for nxt in sorted(graph[node]):
            if nxt in path:
                cycles.append(" -> ".join(path[path.index(nxt):] + [nxt]))
            elif len(path) < len(PARTS):
                visit(nxt, path + [nxt])
    for start in sorted(graph):
        visit(start, [start])
    assert not cycles, sorted(set(cycles))


def test_algos_is_pure_math():
    allowed = {"torch", "__future__", "math", "dataclasses", "typing", "collections",
               "functools", "itertools", "hpc_rlhf"}
    stdlib = set(sys.stdlib_module_names)
    bad = []
    for name, (top, imports) in MODULES.items():
        if top != "algos":
            continue
        for target, line in imports:
            root = target.split(".")[0]
            if root == "hpc_rlhf" and _package(target) != "algos":
                bad.append(f"{name}:{line} imports {target}")
            elif root not in allowed and not (root in stdlib and root not in ("os", "subprocess")):
                bad.append(f"{name}:{line} imports {target}")
    assert not bad, bad


def test_the_check_sees_lazy_and_relative_upward_imports():
    """What a check reading only top-level absolute imports would miss."""
    src = ("import torch\n\n\ndef build():\n    from ..recipes import sft\n"
           "    import hpc_rlhf.launch.main\n    from .logprobs import token_logprobs\n")
    fake = {"hpc_rlhf.engine.fake": ("engine", _imports("hpc_rlhf.engine.fake", False, src))}
    found = _upward(fake)
    assert [f.split(" (")[0] for f in found] == [
        "hpc_rlhf.engine.fake:5 imports hpc_rlhf.recipes",
        "hpc_rlhf.engine.fake:5 imports hpc_rlhf.recipes.sft",
        "hpc_rlhf.engine.fake:6 imports hpc_rlhf.launch.main"], found
