"""A tiny CPU workload for slurm/tiny_test.sbatch: gloo all_reduces plus the preemption contract.

Every rank runs `--steps` steps; step s all_reduces (rank + 1) * (s + 1), and rank 0 adds the
result to a running total, so an uninterrupted run ends with

    total = sum_{s < steps} (s + 1) * world * (world + 1) / 2

On SIGUSR1 the ranks agree (the stop flag rides in the same all_reduce) to stop after the
current step; rank 0 saves {next_step, total} to $HPC_RLHF_RUN_DIR/ckpt.json, writes
$HPC_RLHF_RUN_DIR/REQUEUE (the sbatch script then requeues the job), all ranks pass a barrier
and exit 0. A requeued run resumes from ckpt.json and must end with the same total.

    python -m hpc_rlhf.launch.smoke [--steps 20] [--step-seconds 0.25] [--fail-rank R]
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from datetime import timedelta
from pathlib import Path


def expected_total(steps: int, world: int) -> int:
    return sum((s + 1) * world * (world + 1) // 2 for s in range(steps))


def _write_json(path: Path, obj: dict) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj))
    os.replace(tmp, path)  # atomic: a reader never sees half a file


def _resume(ckpt_path: Path) -> tuple[int, int]:
    """(next step, running total) from the checkpoint, or (0, 0) on a fresh start."""
    if not ckpt_path.exists():
        return 0, 0
    ckpt = json.loads(ckpt_path.read_text())
    return ckpt["next_step"], ckpt["total"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--step-seconds", type=float, default=0.25, help="sleep per step")
    p.add_argument("--fail-rank", type=int, default=-1, help="this rank exits 1 after step 0")
    args = p.parse_args(argv)

    stop_requested = False

    def on_usr1(signum, frame):  # may arrive twice (from the step and from torchrun)
        nonlocal stop_requested
        stop_requested = True

    signal.signal(signal.SIGUSR1, on_usr1)

    import torch
    import torch.distributed as dist

    from hpc_rlhf.topology import collectives

    dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    rank, world = dist.get_rank(), dist.get_world_size()
    run_dir = Path(os.environ.get("HPC_RLHF_RUN_DIR", "runs/smoke"))
    run_dir.mkdir(parents=True, exist_ok=True)
    ckpt_path = run_dir / "ckpt.json"
    restart = int(os.environ.get("SLURM_RESTART_COUNT", "0"))

    start, total = _resume(ckpt_path)
    if rank == 0:
        print(f"[smoke] world={world} restart={restart} resuming at step {start}", flush=True)

    for step in range(start, args.steps):
        # [value, stop flag]: one collective carries both so every rank stops at the same step
        buf = torch.tensor([float((rank + 1) * (step + 1)), float(stop_requested)])
        collectives.all_reduce(buf)
        total += int(buf[0].item())
        if rank == args.fail_rank:
            print(f"[smoke] rank {rank} failing on purpose", flush=True)
            return 1
        if rank == 0:
            _write_json(run_dir / "progress.json", {"step": step, "restart": restart})
        if buf[1].item() > 0:
            if rank == 0:
                _write_json(ckpt_path, {"next_step": step + 1, "total": total})
                (run_dir / "REQUEUE").touch()
                print(f"[smoke] SIGUSR1: checkpoint at step {step + 1}, REQUEUE written", flush=True)
            collectives.barrier()
            dist.destroy_process_group()
            return 0
        time.sleep(args.step_seconds)

    if rank == 0:
        _write_json(run_dir / "result.json",
                    {"world": world, "steps": args.steps, "total": total, "restart": restart})
        print(f"[smoke] done: world={world} steps={args.steps} total={total}", flush=True)
    collectives.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
