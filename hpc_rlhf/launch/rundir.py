"""The run directory: one per job, the same one again after a requeue.

    <run_dir>/config.yaml      resolved config (all defaults filled in, overrides applied; secrets
                           in reward.remote_url masked, so the file can be shared)
    <run_dir>/layout.txt       Layout.describe() of the job
    <run_dir>/logs/rank<R>.log every rank's stdout+stderr lines (tee'd, the console keeps them)
    <run_dir>/REQUEUE          written after a signal-triggered checkpoint (see signals.py)
    <run_dir>/...              checkpoints, metrics: owned by the programs

Where: $HPC_RLHF_RUN_DIR if set (the sbatch script and our submitit task set it), else
launch.run_dir with {name} replaced by launch.name. Both are fixed for a job, so a requeued
job finds its checkpoints.
"""
from __future__ import annotations

import dataclasses
import os
import sys
from pathlib import Path

from hpc_rlhf.config import JobConfig, to_yaml

ENV_RUN_DIR = "HPC_RLHF_RUN_DIR"


def resolve_run_dir(cfg: JobConfig) -> Path:
    env = os.environ.get(ENV_RUN_DIR)
    return Path(env) if env else Path(cfg.launch.run_dir.format(name=cfg.launch.name))


def redacted(cfg: JobConfig) -> JobConfig:
    """`cfg` with the password and query values of reward.remote_url masked ('***'); for
    everything written to the run directory or sent to trackers (wandb, tensorboard)."""
    from hpc_rlhf.rewards.remote import mask_url
    if not cfg.reward.remote_url:
        return cfg
    return dataclasses.replace(cfg, reward=dataclasses.replace(
        cfg.reward, remote_url=mask_url(cfg.reward.remote_url)))


def prepare_run_dir(cfg: JobConfig, layout_text: str, rank: int) -> Path:
    """Create the run directory; global rank 0 writes config.yaml and layout.txt (atomically,
    so a requeued job rewriting them never leaves half a file)."""
    run_dir = resolve_run_dir(cfg)
    (run_dir / "logs").mkdir(parents=True, exist_ok=True)
    if rank == 0:
        for name, text in (("config.yaml", to_yaml(redacted(cfg))),
                           ("layout.txt", layout_text + "\n")):
            tmp = run_dir / f".{name}.tmp"
            tmp.write_text(text)
            os.replace(tmp, run_dir / name)
    return run_dir


class _Tee:
    """Write to the original stream and to a per-rank log file, each line prefixed."""

    def __init__(self, stream, log, prefix: str):
        self._stream, self._log, self._prefix, self._bol = stream, log, prefix, True

    def write(self, text: str) -> int:
        self._stream.write(text)
        out = []
        for ch in text.splitlines(keepends=True):
            out.append((self._prefix if self._bol else "") + ch)
            self._bol = ch.endswith("\n")
        self._log.write("".join(out))
        self._log.flush()
        return len(text)

    def flush(self) -> None:
        self._stream.flush()
        self._log.flush()

    def __getattr__(self, name):
        return getattr(self._stream, name)


def tee_rank_logs(run_dir: Path, rank: int) -> Path:
    """Append this rank's Python-level stdout/stderr to logs/rank<R>.log (a requeued run
    appends to the same file)."""
    path = run_dir / "logs" / f"rank{rank}.log"
    log = open(path, "a", buffering=1)
    sys.stdout = _Tee(sys.stdout, log, "")
    sys.stderr = _Tee(sys.stderr, log, "")
    return path
