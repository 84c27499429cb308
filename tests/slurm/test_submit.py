"""`python -m hpc_rlhf.submit` on the real local 2-node SLURM cluster (submitit + torchrun)."""
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hpc_rlhf.launch.smoke_roles import expected_total

pytestmark = pytest.mark.slurm
REPO = Path(__file__).resolve().parents[2]


def _submit(slurm_cluster, tmp_path, *extra, env=None, timeout=120):
    argv = [sys.executable, "-m", "hpc_rlhf.submit", "--config", "configs/tiny_disagg.yaml",
            "--program", "smoke", "--wait", f"launch.run_dir={tmp_path}/run", *extra]
    t0 = time.monotonic()
    out = subprocess.run(argv, cwd=REPO, env=slurm_cluster.env(**(env or {})),
                         capture_output=True, text=True, timeout=timeout)
    return out, time.monotonic() - t0


def test_submit_smoke_two_nodes_disaggregated(slurm_cluster, tmp_path):
    out, secs = _submit(slurm_cluster, tmp_path, "train.num_steps=3")
    text = out.stdout + out.stderr
    assert out.returncode == 0, text
    assert secs < 60, f"{secs:.0f}s"
    run = tmp_path / "run"
    ranks = [json.loads((run / "smoke" / f"rank{r}.json").read_text()) for r in range(4)]
    # 2 nodes x 2 ranks: torchrun gives each node's agent two consecutive ranks; which node
    # gets ranks 0-1 depends on the order the agents reach the c10d rendezvous.
    nodes = [r["node"] for r in ranks]
    assert nodes[0] == nodes[1] and nodes[2] == nodes[3], text
    assert sorted({nodes[0], nodes[2]}) == ["node1", "node2"], text
    assert [r["roles"] for r in ranks] == [["actor"]] * 3 + [["rollout"]]
    assert [r["measured"]["world"] for r in ranks] == [3, 3, 3, 1]
    assert all(r["measured"]["job"] == 4 for r in ranks)
    result = json.loads((run / "smoke_result.json").read_text())
    assert result["total"] == expected_total(3, 4)
    assert (run / "layout.txt").exists() and (run / "config.yaml").exists()


def test_submit_failing_rank_ends_promptly_and_names_it(slurm_cluster, tmp_path):
    out, secs = _submit(slurm_cluster, tmp_path, "train.num_steps=400",
                        env={"HPC_RLHF_SMOKE_FAIL_RANK": "3"})
    text = out.stdout + out.stderr
    assert out.returncode == 1, text
    assert secs < 60, f"{secs:.0f}s"
    assert "rank      : 3 (local_rank: 1)" in text and "injected failure on rank 3" in text, text


def test_submit_preemption_signal_checkpoints_requeues_and_resumes(slurm_cluster, tmp_path):
    steps = 60
    argv = [sys.executable, "-m", "hpc_rlhf.submit", "--config", "configs/tiny_disagg.yaml",
            "--program", "smoke", f"launch.run_dir={tmp_path}/run", f"train.num_steps={steps}"]
    out = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=60,
                         env=slurm_cluster.env(HPC_RLHF_SMOKE_STEP_S="0.2"))
    assert out.returncode == 0, out.stdout + out.stderr
    job = out.stdout.split("[submit] submitted job ")[1].split(":")[0]
    run = tmp_path / "run"
    deadline = time.monotonic() + 60
    while not all((run / "smoke" / f"rank{r}.json").exists() for r in range(4)):
        assert time.monotonic() < deadline, slurm_cluster.job(job)
        time.sleep(0.3)
    time.sleep(1.0)
    # submitit's preemption signal (USR2) to every task; TorchrunTask forwards USR1 to torchrun
    subprocess.run(["scancel", "--signal=USR2", job], env=slurm_cluster.env(), check=True)
    info = slurm_cluster.wait(job, timeout=120, restarts=1)
    logs = "\n".join(p.read_text() for p in sorted((run / "submitit").glob("*.out")))
    assert (info["JobState"], info["Restarts"]) == ("COMPLETED", "1"), (info, logs)
    assert "requeueing job" in logs, logs
    result = json.loads((run / "smoke_result.json").read_text())
    assert result["restart"] == 1 and result["total"] == expected_total(steps, 4), logs
    assert not (run / "REQUEUE").exists()
