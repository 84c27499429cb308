"""Atomic, resumable training checkpoints.

Layout under `root`:

    step_00000120/              one complete checkpoint (the directory name is the commit)
      actor/ critic/ ...        DeepSpeed engine states: weights, optimizer, scheduler (per rank)
      rng_rank00000.pt ...      python / numpy / torch / cuda RNG of every rank
      trainer_state.pt          step + the caller's extra state (data position, counters, ...)
      COMPLETE                  json written last, before the rename
    .tmp-step_00000130/         a save in progress (or killed): never read, removed next save

Protocol (collective: every rank of the engines calls it): all ranks write into the temp dir,
fsync what is there, barrier; rank 0 writes COMPLETE, fsyncs, renames the temp dir to its final
name, fsyncs `root`, then deletes all but the newest `keep_last`. A kill at any point leaves the
previous checkpoints untouched; `latest_checkpoint` only ever returns a renamed, COMPLETE one.
`root` must be on a file system every rank sees (it is, on a cluster: the job's output dir).
"""
from __future__ import annotations

import json
import logging
import os
import random
import shutil
import time
from pathlib import Path

import numpy as np
import torch

import torch.distributed as dist

from hpc_rlhf.checkpoint.layout import (MARKER, STEP_DIR, describe_start,  # noqa: F401
                                        latest_checkpoint, list_checkpoints, resume_source,
                                        step_dir_name)
from hpc_rlhf.faults import fault_point
from hpc_rlhf.topology import collectives

log = logging.getLogger(__name__)


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def _barrier() -> None:
    collectives.barrier()


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (disk full, quota, I/O error); nothing was committed."""


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(path: Path) -> None:
    """fsync every file, then every directory (bottom-up) under `path`."""
    for dirpath, _, files in os.walk(path, topdown=False):
        for f in files:
            _fsync_path(Path(dirpath) / f)
        _fsync_path(Path(dirpath))


def save_checkpoint(root: str | os.PathLike, step: int, engines: dict,
                    extra_state: dict | None = None, *, keep_last: int = 3) -> Path:
    """Save `engines` ({"actor": deepspeed engine, ...}), RNG of every rank and `extra_state`
    (anything torch.save takes: data position, counters, ...) as checkpoint `step`.

    Collective over the engines' world. Returns the final directory.
    """
    if keep_last < 1:
        raise ValueError(f"keep_last={keep_last} must be >= 1 (the checkpoint just written)")
    root = Path(root)
    rank = _rank()
    tmp = root / f".tmp-{step_dir_name(step)}"
    final = root / step_dir_name(step)
    t0 = time.perf_counter()
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(".tmp-step_*"):  # left by killed saves
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir()
    _barrier()
    try:
        for name, engine in engines.items():
            engine.save_checkpoint(str(tmp), tag=name, client_state={}, save_latest=False)
        torch.save(rng_state(), tmp / f"rng_rank{rank:05d}.pt")
        if rank == 0:
            torch.save({"step": step, "extra": extra_state}, tmp / "trainer_state.pt")
    except (OSError, RuntimeError) as e:
        # torch reports a full disk as "[enforce fail at inline_container.cc] unexpected pos".
        # Nothing half-written stays: the partial directory would hold the space a retry or the
        # requeued job needs (other ranks still writing into it fail too, and the job ends).
        shutil.rmtree(tmp, ignore_errors=True)
        free = shutil.disk_usage(root).free if root.exists() else 0
        raise CheckpointWriteError(
            f"rank {rank}: writing checkpoint step {step} into {tmp} failed ({e}). The disk may "
            f"be full or over quota: {free / 2**20:.1f} MiB free under {root}. The previous "
            "checkpoint is intact; free space, point launch.run_dir at a larger file system, "
            "or lower checkpoint.keep_last") from e
    _barrier()
    fault_point("checkpoint_save")
    _fsync_tree(tmp)  # every rank: flushes what it wrote (others' files are clean: cheap)
    _barrier()
    if rank == 0:
        _commit(tmp, final, {"step": step, "engines": sorted(engines), "world_size": _world(),
                             "time": time.time()})
        for _, old in list_checkpoints(root)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
        log.info("saved checkpoint %s in %.2f s", final, time.perf_counter() - t0)
    _barrier()
    return final


def _commit(tmp: Path, final: Path, meta: dict) -> None:
    marker = tmp / MARKER
    marker.write_text(json.dumps(meta))
    _fsync_path(marker)
    _fsync_path(tmp)
    if final.exists():  # re-saving a step: move the old one aside first, then drop it
        trash = final.with_name(f".trash-{final.name}-{os.getpid()}")
        os.replace(final, trash)
        os.replace(tmp, final)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(tmp, final)
    _fsync_path(final.parent)


def start_run(strategy, ckpt_dir: str | os.PathLike, engines: dict, resume_from: str = "",
              tag: str = "train") -> tuple[int, dict] | None:
    """Collective. Restore a run's engines from its own newest complete checkpoint, else from
    checkpoint.resume_from (a branch); (step, extra_state), or None for a fresh start. Rank 0
    says which, as `[tag] resumed from ...` / `[tag] branched from ...`."""
    source = resume_source(ckpt_dir, resume_from)
    if source is None:
        return None
    step, extra = strategy.load_checkpoint(source[0], engines, step=source[1])
    if strategy.rank == 0:
        print(f"[{tag}] {describe_start(source, step)}", flush=True)
    return step, dict(extra or {})


def load_checkpoint(root: str | os.PathLike, engines: dict, *, step: int | None = None,
                    load_optimizer: bool = True) -> tuple[int, dict | None] | None:
    """Restore engines, this rank's RNG and the extra state from the newest complete checkpoint
    (or `step`). Returns (step, extra_state), or None when `root` holds no checkpoint."""
    if step is None:
        path = latest_checkpoint(root)
        if path is None:
            return None
    else:
        path = Path(root) / step_dir_name(step)
        if not (path / MARKER).is_file():
            raise FileNotFoundError(f"checkpoint step={step} is not a complete checkpoint under "
                                    f"{root}; complete ones: {[s for s, _ in list_checkpoints(root)]}")
    meta = json.loads((path / MARKER).read_text())
    missing = set(engines) - set(meta["engines"])
    if missing:
        raise KeyError(f"checkpoint {path} has engines {meta['engines']}, not {sorted(missing)}")
    for name, engine in engines.items():
        load_path, _ = engine.load_checkpoint(str(path), tag=name,
                                              load_optimizer_states=load_optimizer,
                                              load_lr_scheduler_states=load_optimizer)
        if load_path is None:
            raise RuntimeError(f"DeepSpeed could not load engine {name!r} from {path}")
    rng_file = path / f"rng_rank{_rank():05d}.pt"
    if rng_file.is_file():
        set_rng_state(torch.load(rng_file, weights_only=False))
    else:
        log.warning("%s has no RNG state for rank %d (world size was %s, now %d); RNG not "
                    "restored", path, _rank(), meta["world_size"], _world())
    state = torch.load(path / "trainer_state.pt", weights_only=False)
    return state["step"], state["extra"]
