"""Real 2-node jobs on the local SLURM cluster: torchrun across nodes, requeue, failure, sbatch."""
from __future__ import annotations

import json
import re
import sys
import time
from pathlib import Path

import pytest

from testlib import REPO, scaled, wait_until

pytestmark = pytest.mark.slurm

PYTHON = sys.executable  # the venv running pytest has torch and hpc_rlhf

ALL_REDUCE_WORKER = """
import json, os, sys
from datetime import timedelta
import torch
import torch.distributed as dist

dist.init_process_group("gloo", timeout=timedelta(seconds=60))
rank, world = dist.get_rank(), dist.get_world_size()
t = torch.tensor([rank + 1.0, (rank + 1.0) ** 2])
dist.all_reduce(t)
out = {"rank": rank, "world": world, "sum": t.tolist(), "node": os.environ["SLURMD_NODENAME"]}
with open(os.path.join(sys.argv[1], f"rank{rank}.json"), "w") as f:
    json.dump(out, f)
dist.destroy_process_group()
"""

TORCHRUN_JOB = """#!/bin/bash
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --time=00:05:00
set -euo pipefail
# Rendezvous on the first node, by its SLURM address (node names need not resolve).
head_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
head_addr=$(scontrol show node "$head_node" | sed -n 's/.*NodeAddr=\\([^ ]*\\).*/\\1/p')
# RDZV_PORT: one of the test cluster's own ports (SlurmCluster.rdzv_port).
srun --kill-on-bad-exit=1 "$PY" -m torch.distributed.run --nnodes 2 --nproc-per-node 2 \\
    --rdzv-backend c10d --rdzv-endpoint "$head_addr:$RDZV_PORT" --rdzv-id "$SLURM_JOB_ID" \\
    "$WORKER" "$OUT_DIR"
"""

# A bash "training loop": step i adds i*i. On SIGUSR1 it checkpoints (i, total), requeues
# itself and exits; the requeued run resumes from the checkpoint.
REQUEUE_JOB = """#!/bin/bash
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --time=00:05:00
i=0; total=0
[[ -f $WORK/ckpt ]] && read -r i total < "$WORK/ckpt"
echo "start restart=${SLURM_RESTART_COUNT:-0} i=$i"
stop=0
trap 'stop=1' USR1
while (( i < STEPS )); do
    total=$((total + i * i)); i=$((i + 1))
    echo "$i" > "$WORK/progress"
    if (( stop )); then
        echo "$i $total" > "$WORK/ckpt"
        echo "checkpoint at i=$i; requeue"
        scontrol requeue "$SLURM_JOB_ID"
        exit 0
    fi
    sleep 0.1
done
echo "$total" > "$WORK/result"
"""


def _read(path: Path) -> str:
    return path.read_text() if path.exists() else f"<{path} missing>"


def test_two_node_torchrun_all_reduce(slurm_cluster, tmp_path):
    worker = tmp_path / "worker.py"
    worker.write_text(ALL_REDUCE_WORKER)
    script = tmp_path / "job.sbatch"
    script.write_text(TORCHRUN_JOB)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    job = slurm_cluster.sbatch(
        script, sbatch_args=(f"--output={tmp_path}/job.out",), cwd=tmp_path,
        PY=PYTHON, WORKER=str(worker), OUT_DIR=str(out_dir),
        RDZV_PORT=slurm_cluster.rdzv_port(),
    )
    info = slurm_cluster.wait(job, timeout=90)
    log = _read(tmp_path / "job.out")
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), log
    results = [json.loads(p.read_text()) for p in sorted(out_dir.glob("rank*.json"))]
    assert sorted(r["rank"] for r in results) == [0, 1, 2, 3], log
    for r in results:  # naive reference: sum of (rank+1) and (rank+1)^2 over 4 ranks
        assert r["world"] == 4
        assert r["sum"] == [float(sum(k + 1 for k in range(4))),
                            float(sum((k + 1) ** 2 for k in range(4)))]
    nodes = sorted(r["node"] for r in results)
    assert nodes == ["node1", "node1", "node2", "node2"], "2 ranks on each of the 2 nodes"


def test_requeue_resumes_from_checkpoint(slurm_cluster, tmp_path):
    script = tmp_path / "requeue.sbatch"
    script.write_text(REQUEUE_JOB)
    steps = 60
    works = {name: tmp_path / name for name in ("interrupted", "plain")}
    jobs = {}
    for name, work in works.items():
        work.mkdir()
        jobs[name] = slurm_cluster.sbatch(
            script, sbatch_args=(f"--output={work}/job.out",), cwd=tmp_path,
            WORK=str(work), STEPS=str(steps),
        )
    progress = works["interrupted"] / "progress"
    wait_until(lambda: progress.exists() and progress.read_text().strip() not in ("", "1", "2"),
               30, "the job to reach step 3")
    slurm_cluster.scancel_signal(jobs["interrupted"], "USR1")

    info = slurm_cluster.wait(jobs["interrupted"], timeout=60, restarts=1)
    log = _read(works["interrupted"] / "job.out")
    assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("COMPLETED", "0:0", "1"), log
    plain = slurm_cluster.wait(jobs["plain"], timeout=30)
    assert (plain["JobState"], plain["Restarts"]) == ("COMPLETED", "0")
    # The second run started from the checkpoint, not from step 0.
    resumed = re.search(r"start restart=1 i=(\d+)", log)
    assert resumed and 3 <= int(resumed.group(1)) < steps, log
    expected = sum(i * i for i in range(steps))
    assert int(_read(works["interrupted"] / "result")) == expected, log
    assert _read(works["plain"] / "result") == _read(works["interrupted"] / "result")


def _submit_tiny(slurm_cluster, tmp_path: Path, *args: str) -> tuple[str, Path, Path]:
    run_dir, log = tmp_path / "run", tmp_path / "tiny.out"
    job = slurm_cluster.sbatch(
        REPO / "slurm" / "tiny_test.sbatch", *args, sbatch_args=(f"--output={log}",),
        PYTHON=PYTHON, RUN_DIR=str(run_dir), RDZV_PORT=slurm_cluster.rdzv_port(),
    )
    return job, run_dir, log


def _expected_total(steps: int, world: int) -> int:
    total = 0
    for step in range(steps):
        total += sum((rank + 1) * (step + 1) for rank in range(world))
    return total


def test_failing_rank_fails_the_job_fast(slurm_cluster, tmp_path):
    job, run_dir, log = _submit_tiny(slurm_cluster, tmp_path, "--steps", "200", "--fail-rank", "3")
    # Rank 0 writes progress.json after step 0, when rank 3 exits: time the failure from there
    # (not from submission: starting 6 Python processes on a loaded CI host varies a lot).
    wait_until((run_dir / "progress.json").exists, 90, "step 0")
    failed_at = time.monotonic()
    info = slurm_cluster.wait(job, timeout=60)
    elapsed = time.monotonic() - failed_at
    text = _read(log)
    assert info["JobState"] == "FAILED" and info["ExitCode"] != "0:0", (info, text)
    assert elapsed < scaled(30), f"the job took {elapsed:.0f}s to end after rank 3 exited"
    # torchrun's error summary names the failing global rank.
    assert re.search(r"rank\s*:\s*3 \(local_rank: 1\)", text), text


def test_tiny_test_sbatch_completes(slurm_cluster, tmp_path):
    steps = 5
    job, run_dir, log = _submit_tiny(slurm_cluster, tmp_path, "--steps", str(steps),
                                     "--step-seconds", "0.05")
    info = slurm_cluster.wait(job, timeout=90)
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), _read(log)
    result = json.loads(_read(run_dir / "result.json"))
    assert result == {"world": 4, "steps": steps, "total": _expected_total(steps, 4),
                      "restart": 0}


def test_tiny_test_sbatch_usr1_checkpoints_and_requeues(slurm_cluster, tmp_path):
    steps = 40
    job, run_dir, log = _submit_tiny(slurm_cluster, tmp_path, "--steps", str(steps),
                                     "--step-seconds", "0.1")
    progress = run_dir / "progress.json"
    wait_until(lambda: progress.exists() and json.loads(progress.read_text())["step"] >= 2,
               90, "tiny_test to reach step 2")
    slurm_cluster.scancel_signal(job, "USR1")
    info = slurm_cluster.wait(job, timeout=120, restarts=1)
    text = _read(log)
    assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("COMPLETED", "0:0", "1"), text
    assert "requeueing job" in text, text
    resumed = re.search(r"restart=1 resuming at step (\d+)", text)
    assert resumed and 3 <= int(resumed.group(1)) < steps, text
    result = json.loads(_read(run_dir / "result.json"))
    assert result == {"world": 4, "steps": steps, "total": _expected_total(steps, 4),
                      "restart": 1}
    assert not (run_dir / "REQUEUE").exists()
