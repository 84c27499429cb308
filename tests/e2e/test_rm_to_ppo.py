"""Reward model -> PPO through the real entry point: the RM trainer's export (run_dir/export)
is a plain HF sequence classifier that `reward.source=model` loads, and the rewards PPO trains
on equal that model's scores of the very texts PPO scored (samples.jsonl), computed here with
plain transformers, independently of hpc_rlhf's reward code."""
import json

import pytest
import torch

from distlib import ROOT
from hpc_rlhf.metrics.logger import read_metrics

pytestmark = [pytest.mark.e2e, pytest.mark.deepspeed]

RM_STEPS, PPO_STEPS = 4, 2
SAMPLES = 8 * 8  # grpo_tiny: prompts_per_step x n_samples_per_prompt, all on rank 0


def _hf_score(model, tok, prompt: str, response: str) -> float:
    """The value head at the last token of prompt + response (+ eos), as the RM was trained:
    the prompt as the policy saw it, chat template applied."""
    ids = tok(prompt + response, add_special_tokens=False)["input_ids"]
    if not ids or ids[-1] != tok.eos_token_id:
        ids = ids + [tok.eos_token_id]
    with torch.no_grad():
        trunk = getattr(model, model.base_model_prefix)
        hidden = trunk(input_ids=torch.tensor([ids])).last_hidden_state    # [1, T, h]
        return model.score(hidden)[0, -1, 0].item()


def test_rm_export_is_the_ppo_reward(rl_job, tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from hpc_rlhf.data.synthetic import write_toy_datasets
    data = write_toy_datasets(tmp_path / "data", n_train=64, n_eval=16)
    rm = rl_job(tmp_path / "rm", [f"data.prompts={data / 'pairs_train.jsonl'}",
                                  f"data.eval_prompts={data / 'pairs_eval.jsonl'}",
                                  f"train.num_steps={RM_STEPS}", "checkpoint.export_hf=true",
                                  "reward.normalize=true"],
                nproc=2, config=ROOT / "configs" / "rm_tiny.yaml", timeout_s=300)
    rows = read_metrics(rm.run_dir)
    assert [r["step"] for r in rows] == list(range(0, RM_STEPS + 1)), rows  # 0: baseline eval
    assert "loss" in rows[-1] and "eval_accuracy" in rows[-1], rows[-1]
    export = rm.run_dir / "export"
    model = AutoModelForSequenceClassification.from_pretrained(export).eval()
    tok = AutoTokenizer.from_pretrained(export)
    assert model.config.num_labels == 1
    assert not (rm.run_dir / "export" / "reward_model.pt").exists()
    assert f"model: {export}" in rm.log.read_text()       # the summary names the export

    # reward.normalize: the RM trainer recorded its held-out score mean/std (OpenRLHF's keys)
    config = json.loads((export / "config.json").read_text())
    assert config["normalize_reward"] is True and config["std"] > 0, config
    mean, std = config["mean"], config["std"]
    ppo = rl_job(tmp_path / "ppo", ["algorithm.name=ppo", "reward.source=model",
                                    "reward.normalize=true",
                                    f"model.reward_model_path={export}",
                                    f"logging.samples_per_step={SAMPLES}",
                                    f"train.num_steps={PPO_STEPS}"], timeout_s=300)
    samples = [json.loads(line) for line in
               (ppo.run_dir / "samples.jsonl").read_text().splitlines()]
    assert [s["step"] for s in samples] == [k for k in range(1, PPO_STEPS + 1)
                                            for _ in range(SAMPLES)]
    assert all(s["prompt"].startswith("<|user|>") and s["prompt"].endswith("<|assistant|>")
               and s["message"] in s["prompt"] for s in samples)
    want = torch.tensor([(_hf_score(model, tok, s["prompt"], s["response"]) - mean) / std
                         for s in samples])
    got = torch.tensor([s["reward"] for s in samples])
    assert want.std() > 0, "the RM gives every sample the same score: nothing is compared"
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    metrics = {r["step"]: r for r in read_metrics(ppo.run_dir)}
    for step in range(1, PPO_STEPS + 1):     # the logged reward is the mean of those scores
        mean = got[(step - 1) * SAMPLES:step * SAMPLES].mean().item()
        assert metrics[step]["reward/mean"] == pytest.approx(mean, abs=1e-5)
