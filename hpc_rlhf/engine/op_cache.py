"""A stable cache for DeepSpeed's JIT-built ops, and removal of stale build locks.

torch.utils.cpp_extension guards each op's build directory with a `lock` file (FileBaton): the
builder creates it with O_EXCL, keeps it open while compiling and deletes it when done. A build
killed half-way leaves the file behind and every later run spins on it forever. A lock is stale
when it is older than a few minutes *and* no live process holds it open (Linux /proc).
"""
from __future__ import annotations

import os
import time
from pathlib import Path

ENV = "TORCH_EXTENSIONS_DIR"


def default_extensions_dir() -> Path:
    return Path(os.path.expanduser("~/.cache/hpc_rlhf/torch_extensions"))


def ensure_extensions_dir() -> Path:
    """Set TORCH_EXTENSIONS_DIR (unless already set) to a stable per-user cache and create it."""
    path = Path(os.environ.setdefault(ENV, str(default_extensions_dir())))
    path.mkdir(parents=True, exist_ok=True)
    return path


def _open_paths() -> set[str] | None:
    """Real paths of every file some readable process holds open; None without /proc."""
    proc = Path("/proc")
    if not (proc / "self" / "fd").is_dir():
        return None
    paths: set[str] = set()
    for pid_dir in proc.iterdir():
        if not pid_dir.name.isdigit():
            continue
        try:
            fds = list((pid_dir / "fd").iterdir())
        except OSError:  # process gone or not ours
            continue
        for fd in fds:
            try:
                paths.add(os.readlink(fd))
            except OSError:
                continue
    return paths


def clear_stale_locks(root: str | os.PathLike | None = None, min_age_s: float = 180.0,
                      without_proc_age_s: float = 1800.0) -> list[Path]:
    """Delete `lock` files under `root` (default: TORCH_EXTENSIONS_DIR) left by dead builders.

    A lock younger than `min_age_s` or open in a live process is kept. Where /proc is missing
    only age counts, with the longer `without_proc_age_s`. Returns the paths removed.
    """
    root = Path(root) if root is not None else Path(os.environ.get(ENV, default_extensions_dir()))
    if not root.is_dir():
        return []
    locks = [p for p in root.rglob("lock") if p.is_file()]
    if not locks:
        return []
    held = _open_paths()
    now = time.time()
    removed = []
    for lock in locks:
        try:
            age = now - lock.stat().st_mtime
        except FileNotFoundError:
            continue
        limit = min_age_s if held is not None else without_proc_age_s
        if age < limit or (held is not None and str(lock.resolve()) in held):
            continue
        try:
            lock.unlink()
            removed.append(lock)
        except FileNotFoundError:
            pass
    return removed
