"""REINFORCE++, REINFORCE++-baseline, RLOO and Dr.GRPO each run 3 steps end to end (HF
engine: the same training path as vLLM and ~15 s less start-up per job).

Two of them carry a KL term to a frozen reference model (the `ref` path of build_models):
RLOO as a loss term (k3), REINFORCE++ inside the reward (k1, as OpenRLHF does). Before the first
update policy == reference, so step 1's KL is ~0; after updates it must be positive. Those two
also run dynamic micro-batches under a token budget (more, smaller micro-batches than the
fixed micro_batch_size gives; tests/distributed/test_rl_micro_grads.py checks their gradient).
RLOO also runs shared-prompt forwards (one packed row per prompt group): its step-1 KL ~0 and
the engine-vs-trainer gap < 1e-4 check those logprobs against the engine and the reference's.
"""
import math

import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.deepspeed]

STEPS = 3
BUDGET = 256  # dynamic micro-batches (rl/micro.py) for two of the cases: ~8 rows each
FIXED_MICRO_BATCHES = 64 // 16  # grpo_tiny: batch_size / micro_batch_size on one rank
COMMON = ("rollout.engine=hf", "train.actor_lr=5e-3", f"train.num_steps={STEPS}",
          "checkpoint.save_every=0")
CASES = {
    "reinforce": ("algorithm.kl_coef=0.05", "algorithm.kl_in_reward=true",
                  "algorithm.kl_estimator=k1", f"train.max_tokens_per_micro_batch={BUDGET}"),
    "reinforce_baseline": (),
    "rloo": ("algorithm.kl_coef=0.1", "algorithm.kl_estimator=k3",
             f"train.max_tokens_per_micro_batch={BUDGET}", "train.shared_prompt=true"),
    "dr_grpo": ("algorithm.loss_agg=seq_mean_token_sum_norm",),
}


@pytest.mark.parametrize("algorithm", sorted(CASES))
def test_algorithm_runs_with_finite_losses(algorithm, tmp_path, rl_job):
    extra = CASES[algorithm]
    job = rl_job(tmp_path / algorithm, [*COMMON, f"algorithm.name={algorithm}", *extra])
    rows = job.metrics
    assert [m["step"] for m in rows] == list(range(1, STEPS + 1))
    for m in rows:
        for key in ("loss/policy", "policy/entropy", "advantage/abs_mean", "reward/mean"):
            assert math.isfinite(m[key]), f"step {m['step']} {key}={m[key]}"
        assert m["advantage/abs_mean"] > 0, "advantages all zero: nothing to learn from"
        assert 0.0 <= m["reward/mean"] <= 1.0
        assert m["rollout/logprob_gap_mean"] < 1e-4  # HF replica synced each step
        if "train.shared_prompt=true" in extra:   # whole groups per micro-batch, and a
            assert m["train/micro_batches"] >= 2      # group's row is much shorter than 8 rows
        elif any(o.startswith("train.max_tokens_per_micro_batch") for o in extra):
            assert m["train/micro_batches"] > FIXED_MICRO_BATCHES, m["train/micro_batches"]
    kl_coef = next((float(o.split("=")[1]) for o in extra if o.startswith("algorithm.kl_coef")),
                   0.0)
    if not kl_coef:
        assert "kl/mean" not in rows[0], "a reference model was built without a KL term"
        return
    kl = [m["kl/mean"] for m in rows]
    assert all(math.isfinite(x) for x in kl)
    assert abs(kl[0]) < 1e-5, f"step 1 KL {kl[0]}: policy and reference start identical"
    assert abs(kl[-1]) > 10 * max(abs(kl[0]), 1e-9), f"KL did not grow after updates: {kl}"
    assert all(m["kl/coef"] == pytest.approx(kl_coef) for m in rows)
    if "algorithm.kl_in_reward=true" in extra:
        assert "loss/kl" not in rows[0], "KL in the reward must not also be a loss term"
    else:
        assert all(math.isfinite(m["loss/kl"]) and m["loss/kl"] >= 0 for m in rows)
