"""The `eval` program scores a model without training it: for a run's exported weights it
gives exactly the held-out reward the run logged at that step (same prompts, greedy sampling
and reward; the mean over both ranks' shares)."""
from __future__ import annotations

import json

import pytest

from rljob import metrics, run_rl

pytestmark = pytest.mark.e2e


@pytest.mark.timeout(900)
def test_eval_program_equals_the_runs_held_out_reward(tmp_path):
    run = tmp_path / "run"
    rc, out, _ = run_rl(run, ["train.num_steps=4", "eval.every=2", "eval.num_prompts=8",
                              "checkpoint.export_hf=true"], timeout=400)
    assert rc == 0, out[-3000:]
    logged = metrics(run)[4]["eval/reward"]
    rc, out, _ = run_rl(tmp_path / "eval", ["train.num_steps=4", "eval.every=2",
                                            "eval.num_prompts=8", f"model.path={run / 'export'}"],
                        env={"HPC_RLHF_PROGRAM": "eval"}, timeout=300)
    assert rc == 0, out[-3000:]
    result = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert result["prompts"] == 8 and result["model"] == str(run / "export")
    assert result["eval/reward"] == pytest.approx(logged, abs=1e-9), (result, logged)
    assert f"[eval] held-out reward {logged:.4f} on 8 prompts" in out
