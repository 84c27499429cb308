"""A colocated GRPO run on CUDA: tiny Llama in bf16, ZeRO-3, the HF rollout engine, DeepSpeed
states offloaded while the engine generates (hpc_rlhf.engine.memory_schedule). The offload must free
the GPU memory it claims to move, and training must stay finite."""
import json
import math
import subprocess
import sys

import pytest

from gpulib import record
from testlib import REPO, scaled

pytestmark = pytest.mark.gpu


def test_colocated_grpo_bf16_zero3_offloads_between_phases(tmp_path):
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "hpc_rlhf.launch.main", "--config", "configs/grpo_tiny.yaml",
           "rollout.engine=hf", "model.dtype=bfloat16", "train.zero_stage=3",
           "rollout.enable_sleep=true", "train.num_steps=3", "checkpoint.save_every=0",
           "logging.tensorboard=false", f"launch.run_dir={run_dir}"]
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=scaled(420))
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-5000:]
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "loss/policy" in r]
    assert [r["step"] for r in rows] == [1, 2, 3]
    for r in rows:
        assert math.isfinite(r["loss/policy"]) and 0.0 <= r["reward/mean"] <= 1.0, r
        # What the offload counted really left the GPU (within 10%: allocator rounding).
        assert r["memory/offloaded_gib"] > 0, r
        assert r["memory/offload_drop_gib"] >= 0.9 * r["memory/offloaded_gib"], r
    last = rows[-1]
    assert "[train] train.zero_stage=3 in a 1-rank world" not in out.stdout  # stage 3 kept
    record("colocated GRPO bf16 ZeRO-3 + offload", "ok",
           f"offloaded {last['memory/offloaded_gib'] * 1024:.1f} MiB, GPU drop "
           f"{last['memory/offload_drop_gib'] * 1024:.1f} MiB; peaks rollout "
           f"{last.get('memory/rollout_peak_gib', 0) * 1024:.0f} / train "
           f"{last.get('memory/train_peak_gib', 0) * 1024:.0f} MiB; "
           f"logprob gap {last.get('rollout/logprob_gap_mean', float('nan')):.3g}")
