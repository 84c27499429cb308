"""Shared pytest setup: markers that skip themselves, and an empty model cache per session.

Every pytest session builds its models into a fresh HPC_RLHF_CACHE (removed at the end), so a
first-build bug cannot hide behind a cache warmed long ago; the ranks and jobs that tests start
inherit it. HPC_RLHF_TEST_CACHE=DIR reuses a given cache instead (local iteration only; CI never
sets it). DeepSpeed's JIT ops stay in their own cache (TORCH_EXTENSIONS_DIR), built by
`make venv` in a process of its own.
"""
import os
import shutil
import tempfile

import pytest

# vLLM on CPU: keep the KV cache small and the engine in-process (no fork inside pytest).
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


_OWN_CACHE = None


def pytest_configure(config):
    global _OWN_CACHE
    given = os.environ.get("HPC_RLHF_TEST_CACHE")
    if given:
        os.environ["HPC_RLHF_CACHE"] = given
    else:
        _OWN_CACHE = tempfile.mkdtemp(prefix="hpc_rlhf_test_cache_")
        os.environ["HPC_RLHF_CACHE"] = _OWN_CACHE


def pytest_unconfigure(config):
    if _OWN_CACHE:
        shutil.rmtree(_OWN_CACHE, ignore_errors=True)


# REQUIRE_GPU=1 (scripts/gpu_check.sh): a `gpu` test that skips fails instead, except for
# the optional packages below, whose tests skip with the reason printed.
REQUIRE_GPU = os.environ.get("REQUIRE_GPU") == "1"
OPTIONAL_GPU_PACKAGES = ("flash-attn", "flash_attn", "ring-flash-attn", "ring_flash_attn", "vllm")


def _xdist_groups(items) -> None:
    """Under `pytest -n N --dist loadgroup` (make test-stress): each test module stays on one
    worker, as in a serial run (module fixtures, the TP2 tests' /dev/shm before/after check), and
    every SLURM test shares one worker, so a single local cluster serves them."""
    for item in items:
        module = item.nodeid.split("::")[0]
        group = "slurm" if module.startswith("tests/slurm/") else module
        item.add_marker(pytest.mark.xdist_group(group))


def pytest_collection_modifyitems(config, items):
    _xdist_groups(items)
    import torch
    if torch.cuda.is_available() or REQUIRE_GPU:
        return
    skip_gpu = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if REQUIRE_GPU and report.skipped and "gpu" in item.keywords:
        reason = str(report.longrepr[-1]) if isinstance(report.longrepr, tuple) else ""
        if not any(p in reason for p in OPTIONAL_GPU_PACKAGES):
            report.outcome = "failed"
            report.longrepr = f"REQUIRE_GPU=1, but the test skipped: {reason}"
