"""The "smoke" program: exercises every group of the Topology plus checkpoint/resume.

    python -m hpc_rlhf.launch.main --config X.yaml --program smoke     (or HPC_RLHF_PROGRAM=smoke)

1. Group checks: all_reduce of ones over the rank's default world, its dp/tp/sp groups and the
   job group must equal their sizes from the Layout; the sync group broadcasts 42 from the
   actor. Each rank writes run_dir/smoke/rank<R>.json with what it measured.
2. train.num_steps steps over the job group: step s sums (global rank + 1) * (s + 1), so an
   uninterrupted run ends with total = sum_s (s + 1) * N (N + 1) / 2 (resume must not change it).
   The stop flag rides in the same all_reduce, so all ranks stop at the same step after a
   signal; rank 0 then saves {next_step, total} and writes REQUEUE.
Fault injection (tests): HPC_RLHF_SMOKE_FAIL_RANK=R makes global rank R, at step
HPC_RLHF_SMOKE_FAIL_STEP (default 1), do HPC_RLHF_SMOKE_FAIL_MODE: raise | kill (SIGKILL
itself) | hang (sleep while the others wait in the collective); with HPC_RLHF_SMOKE_FAIL_ATTEMPT=K
only in torchrun's restart attempt K (TORCHELASTIC_RESTART_COUNT), so a restart can succeed.
HPC_RLHF_SMOKE_STEP_S: sleep per step (default 0.05).
"""
from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import torch

from hpc_rlhf.runtime import signals


def expected_total(steps: int, world: int) -> int:
    return sum((s + 1) * world * (world + 1) // 2 for s in range(steps))


def _write_json(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def check_groups(topo) -> dict:
    """Measured size of every group this rank belongs to (all_reduce of ones)."""
    measured = {}
    for name in ("world", "dp", "tp", "sp", "job"):
        if topo.groups.get(name) is not None:
            measured[name] = int(topo.all_reduce(torch.ones(1), name).item())
            want = len(topo.group_ranks[name])
            if measured[name] != want:
                raise RuntimeError(f"rank {topo.rank}: group {name!r} summed to "
                                   f"{measured[name]}, expected its size {want}")
    if topo.sync_group is not None:
        t = torch.full((4,), 42.0) if topo.group_rank("sync") == 0 else torch.zeros(4)
        measured["sync"] = float(topo.broadcast(t, 0, "sync").sum().item())
    return measured


def _maybe_fail(rank: int, step: int) -> None:
    if int(os.environ.get("HPC_RLHF_SMOKE_FAIL_RANK", "-1")) != rank:
        return
    if step != int(os.environ.get("HPC_RLHF_SMOKE_FAIL_STEP", "1")):
        return
    attempt = os.environ.get("HPC_RLHF_SMOKE_FAIL_ATTEMPT")
    if attempt is not None and os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != attempt:
        return
    mode = os.environ.get("HPC_RLHF_SMOKE_FAIL_MODE", "raise")
    print(f"[rank {rank}] smoke: injected failure '{mode}' at step {step}", flush=True)
    if mode == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    if mode == "hang":
        time.sleep(3600)
    raise RuntimeError(f"smoke: injected failure on rank {rank} at step {step}")


def run(cfg, topo, run_dir: Path) -> None:
    rank, world = topo.rank, topo.world_size
    measured = check_groups(topo)
    _write_json(run_dir / "smoke" / f"rank{rank}.json",
                {"rank": rank, "roles": list(topo.roles), "world": topo.info.world,
                 "world_rank": topo.world_rank, "engine": topo.engine_index,
                 "node": os.environ.get("SLURMD_NODENAME", ""),
                 "measured": measured})
    ckpt = run_dir / "smoke_ckpt.json"
    start, total = 0, 0
    if ckpt.exists():
        state = json.loads(ckpt.read_text())
        start, total = state["next_step"], state["total"]
    restart = int(os.environ.get("SLURM_RESTART_COUNT", "0"))
    if rank == 0:
        print(f"[rank 0] smoke: world {world}, resuming at step {start}, restart {restart}",
              flush=True)
    step_s = float(os.environ.get("HPC_RLHF_SMOKE_STEP_S", "0.05"))
    for step in range(start, cfg.train.num_steps):
        _maybe_fail(rank, step)
        buf = torch.tensor([float((rank + 1) * (step + 1)), float(signals.checkpoint_requested())])
        topo.all_reduce(buf, "job")  # [value, stop votes]
        total += int(buf[0].item())
        if buf[1].item() > 0:
            if rank == 0:
                _write_json(ckpt, {"next_step": step + 1, "total": total})
                signals.request_requeue(run_dir)
                print(f"[rank 0] smoke: checkpoint at step {step + 1}, REQUEUE written",
                      flush=True)
            topo.barrier("job")
            return
        time.sleep(step_s)
    if rank == 0:
        _write_json(run_dir / "smoke_result.json",
                    {"world": world, "steps": cfg.train.num_steps, "total": total,
                     "expected": expected_total(cfg.train.num_steps, world),
                     "restart": restart, "worlds": [n for n, _ in topo.layout.worlds]})
        print(f"[rank 0] smoke: done, total {total}", flush=True)
    topo.barrier("job")
