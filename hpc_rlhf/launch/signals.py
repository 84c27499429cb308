"""Preemption signals -> a flag the training loops poll; REQUEUE marker for the batch script.

    install()                        # once, in the rank's main thread, before heavy imports
    ...
    if checkpoint_requested():       # poll once per step; agree across ranks (all_reduce a
        save(...)                    #   flag) so every rank stops at the same step
        request_requeue(run_dir)     # global rank 0 only; then barrier and return
        return

SIGUSR1 (SLURM's `--signal=B:USR1@lead`, forwarded by the sbatch script / our submitit task ->
srun -> torchrun -> ranks) only sets the flag: the job has `launch.signal_lead_s` to save.
A rank may get it twice (from the step and from torchrun): the flag is idempotent.
SIGUSR2 is treated like SIGUSR1: it is submitit's preemption signal, and SLURM delivers a
step signal to every process of the step (torchrun and the ranks too), not only to the task.

SIGTERM also sets the flag, but it is what torchrun sends to the surviving ranks when another
rank has died, and those ranks are usually blocked inside a C++ collective where a Python
signal handler never runs. A Python-only handler would turn "the job fails now" into "the job
hangs until torchrun's --shutdown-timeout SIGKILLs it". So a watchdog thread learns about the
signal from `signal.set_wakeup_fd` (written by the C-level handler even while the main thread
is blocked), dumps every thread's stack to stderr and hard-exits with 128+15 if the process is
still alive `HPC_RLHF_TERM_GRACE_S` (default 10) seconds later.
"""
from __future__ import annotations

import faulthandler
import os
import signal
import sys
import threading
from pathlib import Path

REQUEUE_FILE = "REQUEUE"
_flag = threading.Event()
_state: dict = {"installed": False, "signals": []}


def checkpoint_requested() -> bool:
    """True once SIGUSR1, SIGUSR2 or SIGTERM arrived (stays true)."""
    return _flag.is_set()


def received_signals() -> list:
    """Names of the signals received so far, in order (for logs)."""
    return list(_state["signals"])


def request_checkpoint() -> None:
    """Set the flag from code (tests, a time budget check)."""
    _flag.set()


def request_requeue(run_dir: str | os.PathLike) -> Path:
    """Write the REQUEUE marker after a checkpoint was saved (global rank 0 only). The sbatch
    script / submitit task requeues the job when it sees the marker after torchrun ends."""
    path = Path(run_dir) / REQUEUE_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch()
    return path


def requeue_requested(run_dir: str | os.PathLike) -> bool:
    return (Path(run_dir) / REQUEUE_FILE).exists()


def _on_signal(signum, frame) -> None:
    _flag.set()
    name = signal.Signals(signum).name
    if not _state["signals"] or _state["signals"][-1] != name:
        _state["signals"].append(name)


def _watchdog(read_fd: int, grace_s: float, rank: str) -> None:
    while True:
        try:
            data = os.read(read_fd, 64)
        except OSError:
            return
        if not data:
            return
        for signum in data:
            if signum in (signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM):
                _flag.set()
            if signum == signal.SIGTERM:
                threading.Timer(grace_s, _hard_exit, (rank, grace_s)).start()
                return


def _hard_exit(rank: str, grace_s: float) -> None:
    sys.stderr.write(f"[rank {rank}] SIGTERM: still alive {grace_s:.0f}s later (likely blocked "
                     "in a collective with a dead peer); stacks follow, exiting 143\n")
    faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
    sys.stderr.flush()
    os._exit(143)


def install(grace_s: float | None = None) -> None:
    """Install the handlers and the SIGTERM watchdog (main thread; idempotent)."""
    if _state["installed"]:
        return
    if grace_s is None:
        grace_s = float(os.environ.get("HPC_RLHF_TERM_GRACE_S", "10"))
    signal.signal(signal.SIGUSR1, _on_signal)
    signal.signal(signal.SIGUSR2, _on_signal)
    signal.signal(signal.SIGTERM, _on_signal)
    r, w = os.pipe()
    os.set_blocking(w, False)
    signal.set_wakeup_fd(w, warn_on_full_buffer=False)
    rank = os.environ.get("HPC_RLHF_GLOBAL_RANK", os.environ.get("RANK", "0"))
    threading.Thread(target=_watchdog, args=(r, grace_s, rank), daemon=True,
                     name="hpc_rlhf-sigterm-watchdog").start()
    _state["installed"] = True
