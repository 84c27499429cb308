"""Opt-in profile of one phase of one step, for finding where a step's time goes.

HPC_RLHF_PROFILE=PHASE:STEP (e.g. train:3) runs that step's PHASE under torch.profiler (CPU
operators, grouped by input shape) and writes the operator table, sorted by self time, to
<run_dir>/logs/profile_<phase>_<step>_rank<r>.txt. Unset (the default) it costs nothing."""
from __future__ import annotations

import contextlib
import os
from pathlib import Path


def _wanted(phase: str, step: int) -> bool:
    spec = os.environ.get("HPC_RLHF_PROFILE", "")
    if not spec:
        return False
    name, _, at = spec.partition(":")
    if not at.isdigit():
        raise ValueError(f"HPC_RLHF_PROFILE={spec!r}: expected PHASE:STEP, e.g. train:3")
    return name == phase and int(at) == step


@contextlib.contextmanager
def profile_phase(phase: str, step: int, run_dir: Path, rank: int = 0):
    if not _wanted(phase, step):
        yield
        return
    import torch
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        yield
    out = Path(run_dir) / "logs" / f"profile_{phase}_{step}_rank{rank}.txt"
    out.parent.mkdir(parents=True, exist_ok=True)
    table = prof.key_averages(group_by_input_shape=True).table(
        sort_by="self_cpu_time_total", row_limit=60, max_name_column_width=60,
        max_shapes_column_width=80)
    flat = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=40,
                                     max_name_column_width=60)
    out.write_text(f"# threads: {torch.get_num_threads()}\n{flat}\n\n# by input shape\n{table}\n")
    print(f"[profile] {phase} of step {step} -> {out}", flush=True)
