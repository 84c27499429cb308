"""Fault injection for the reliability suite (tests/faults): make one rank fail at a named point.

    HPC_RLHF_FAULT=PHASE:RANK:KIND[:NTH]      e.g. train:1:kill:3

At the NTH (default 1) time global rank RANK passes `fault_point(PHASE)`, it
  kill   SIGKILLs itself (an OOM kill, a node loss),
  term   sends itself SIGTERM (what torchrun / SLURM send: the rank checkpoints at the next
         step boundary, or hard-exits 143 after HPC_RLHF_TERM_GRACE_S; runtime/signals.py),
  raise  raises FaultInjected (a Python error in that phase),
  hang   sleeps HPC_RLHF_FAULT_HANG_S seconds (default 3600: a stuck rank; the collective
         timeout or the launcher must end the job).
PHASE is free text; the RL loops name: rollout, reward, train, weight_sync, checkpoint_save
(in disaggregated mode the rollout-only ranks pass `rollout` once per generation, the first
for step 1, and the trainers pass train / weight_sync).
Unset (the normal case) it costs one dict lookup. Counting is per process, so a requeued /
resumed job only fails again if the variable is still set.
"""
from __future__ import annotations

import os
import signal
import sys
import time

ENV = "HPC_RLHF_FAULT"
KINDS = ("kill", "term", "raise", "hang")
_counts: dict[str, int] = {}


class FaultInjected(RuntimeError):
    pass


def parse(spec: str) -> tuple[str, int, str, int]:
    """'train:1:kill:3' -> ('train', 1, 'kill', 3); a clear error for anything else."""
    parts = spec.split(":")
    try:
        if len(parts) not in (3, 4) or parts[2] not in KINDS:
            raise ValueError
        nth = int(parts[3]) if len(parts) == 4 else 1
        rank = int(parts[1])
        if nth < 1:
            raise ValueError
    except ValueError:
        raise ValueError(f"{ENV}={spec!r} must be PHASE:RANK:KIND[:NTH] with KIND one of "
                         f"{list(KINDS)} and NTH >= 1, e.g. train:1:kill:3") from None
    return parts[0], rank, parts[2], nth


def _global_rank() -> int:
    return int(os.environ.get("HPC_RLHF_GLOBAL_RANK", os.environ.get("RANK", "0")))


def fault_point(phase: str) -> None:
    """Fail here if $HPC_RLHF_FAULT names this phase and this rank (see the module doc)."""
    spec = os.environ.get(ENV)
    if not spec:
        return
    want_phase, rank, kind, nth = parse(spec)
    if phase != want_phase or _global_rank() != rank:
        return
    _counts[phase] = _counts.get(phase, 0) + 1
    if _counts[phase] != nth:
        return
    msg = f"[rank {rank}] {ENV}: injecting {kind} in {phase} (time {_counts[phase]})"
    print(msg, file=sys.stderr, flush=True)
    if kind == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif kind == "term":
        os.kill(os.getpid(), signal.SIGTERM)
    elif kind == "raise":
        raise FaultInjected(msg)
    else:
        time.sleep(float(os.environ.get("HPC_RLHF_FAULT_HANG_S", "3600")))
