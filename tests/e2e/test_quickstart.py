"""The README's main command, as a user runs it (submit --local on configs/quickstart_grpo.yaml,
the embedded SmolLM2 converted into the session's empty cache), cut to 2 steps."""
import json
import math
import re
import subprocess
import sys

import pytest
import torch

from testlib import REPO, scaled

pytestmark = [pytest.mark.e2e, pytest.mark.vllm, pytest.mark.deepspeed]


def test_quickstart_config_runs_two_steps_and_exports(tmp_path):
    run_dir = tmp_path / "quickstart"
    cmd = [sys.executable, "-m", "hpc_rlhf.submit", "--config", "configs/quickstart_grpo.yaml",
           "--local", "train.num_steps=2", f"launch.run_dir={run_dir}",
           "logging.progress_bar=false"]
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=scaled(900))
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-5000:]
    # Quiet by default: our lines only (the libraries' ~20 go to logs/console.log), at most
    # 10 before the closing summary.
    lines = [x for x in re.split(r"[\r\n]", out.stdout + out.stderr) if x.strip()]
    end = next(k for k, x in enumerate(lines) if x.startswith("[rl] done: step 2 of 2 in "))
    assert len(lines[:end]) <= 10 and all(x.startswith(("== ", "[")) for x in lines), lines
    everything = (run_dir / "logs" / "console.log").read_text()
    assert "WARNING" in everything and "WARNING" not in out.stdout + out.stderr
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert rows[0] == {"step": 0, "eval/reward": rows[0]["eval/reward"]}  # the baseline
    rows = rows[1:]
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        assert 0.0 <= r["reward/mean"] <= 1.0 and math.isfinite(r["loss/policy"]), r
        assert r["rollout/logprob_gap_mean"] < 1e-3, r  # fp32: engine and trainer agree
    from transformers import AutoModelForCausalLM, AutoTokenizer
    export = run_dir / "export"
    model = AutoModelForCausalLM.from_pretrained(export, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(export)
    assert model.config.model_type == "llama" and tok("3+4")["input_ids"]
