"""Built-once model directories in the cache, counted only after they were checked to load.

Every entry (a tiny test model, the converted embedded model) is built into a temporary
directory, checked (config, weights and tokenizer load), marked, then renamed into place, under
an exclusive file lock. The directory name carries a key: a hash of the source that builds the
entry and of the transformers version, so a changed builder never reuses a stale entry.

Builds never depend on the caller's rank: transformers 5.x `save_pretrained` silently writes no
config and no weights on a process whose torch.distributed rank is not 0. Inside an initialised
world the build therefore runs in a fresh Python process that has no world.

A marked entry that does not load (files deleted, a half copy, an older bug) is rebuilt, with a
line on stderr that says so.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Callable

MARKER = "hpc_rlhf_cache.json"
# Variables of a launcher's world: a build in a fresh process must not join it.
_WORLD_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK",
              "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID", "TORCHELASTIC_USE_AGENT_STORE")


def cache_dir() -> Path:
    return Path(os.environ.get("HPC_RLHF_CACHE", Path.home() / ".cache" / "hpc_rlhf"))


def build_key(*sources: str, extra: str = "") -> str:
    """8 hex digits over the given module files, `extra` and the transformers version."""
    import transformers
    h = hashlib.sha256(f"{transformers.__version__}|{extra}".encode())
    for src in sources:
        h.update(Path(src).read_bytes())
    return h.hexdigest()[:8]


def in_world() -> bool:
    """True inside an initialised torch.distributed world (where save_pretrained may skip)."""
    import torch.distributed as dist
    return dist.is_available() and dist.is_initialized()


def run_clean(module: str, *args: str) -> None:
    """`python -m module args` in a fresh process outside the caller's world; raises with its
    output if it fails."""
    env = {k: v for k, v in os.environ.items() if k not in _WORLD_ENV}
    out = subprocess.run([sys.executable, "-m", module, *map(str, args)], env=env,
                         capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"`python -m {module} {' '.join(map(str, args))}` failed "
                           f"(exit {out.returncode}):\n{out.stdout[-2000:]}{out.stderr[-4000:]}")


def _weight_files(d: Path) -> list[Path]:
    index = d / "model.safetensors.index.json"
    if index.is_file():
        names = set(json.loads(index.read_text())["weight_map"].values())
        return [d / n for n in sorted(names)]
    return [d / "model.safetensors"]


def hf_dir_problem(d: Path, load: bool = False) -> str | None:
    """Why `d` is not a loadable HF model directory, or None. Cheap by default (the files are
    there and not empty); with `load`, the config, the weights' headers and the tokenizer are
    read by the libraries that will read them later."""
    if not (d / "config.json").is_file():
        return "no config.json"
    for f in _weight_files(d):
        if not f.is_file() or f.stat().st_size == 0:
            return f"no weights ({f.name} missing or empty)"
    if not ((d / "tokenizer.json").is_file() or (d / "tokenizer_config.json").is_file()):
        return "no tokenizer"
    if not load:
        return None
    try:
        from safetensors import safe_open
        from transformers import AutoConfig, AutoTokenizer
        AutoConfig.from_pretrained(d)
        n = 0
        for f in _weight_files(d):
            with safe_open(str(f), framework="pt") as st:
                n += len(list(st.keys()))
        if n == 0:
            return "the weight files hold no tensors"
        AutoTokenizer.from_pretrained(d)
    except Exception as e:  # noqa: BLE001 - any failure to load means the entry is unusable
        return f"does not load ({type(e).__name__}: {e})"
    return None


def _marked(out: Path, key: str) -> bool:
    try:
        return json.loads((out / MARKER).read_text()).get("key") == key
    except (OSError, ValueError):
        return False


def cached_build(out: Path, key: str, build: Callable[[Path], None]) -> Path:
    """Return `out`, building it with build(tmp_dir) first unless a checked entry is there.

    Concurrent callers (pytest workers, several ranks) wait on the lock and reuse the result.
    """
    import fcntl
    if _marked(out, key) and hf_dir_problem(out) is None:
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.with_name(out.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _marked(out, key):
            problem = hf_dir_problem(out)
            if problem is None:  # built by whoever held the lock before us
                return out
            print(f"[cache] {out} is marked complete but has {problem}: rebuilding it",
                  file=sys.stderr, flush=True)
        tmp = out.with_name(out.name + f".tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            build(tmp)
            problem = hf_dir_problem(tmp, load=True)
            if problem is not None:
                raise RuntimeError(f"building the cache entry {out.name}: the result has {problem}")
            (tmp / MARKER).write_text(json.dumps({"key": key}) + "\n")
            shutil.rmtree(out, ignore_errors=True)
            os.replace(tmp, out)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return out
