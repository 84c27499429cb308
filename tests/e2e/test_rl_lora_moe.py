"""The RL recipe with LoRA on actor and critic (PPO), and with a mixture-of-experts actor whose
router load-balancing loss is added to the policy loss (train.aux_loss_coef).

HF engine: the same training path as vLLM, less start-up. The engine-vs-trainer logprob gap
after each sync checks that what the trainer trains (merged LoRA weights, MoE experts) is what
the rollout engine samples from.
"""
import math

import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.deepspeed]

STEPS = 3
COMMON = ("rollout.engine=hf", "train.actor_lr=5e-3", f"train.num_steps={STEPS}",
          "checkpoint.save_every=0")


def test_ppo_with_lora_actor_and_critic(tmp_path, rl_job):
    job = rl_job(tmp_path / "ppo_lora", [*COMMON, "algorithm.name=ppo", "train.critic_lr=5e-3",
                                         "model.lora_rank=8", "model.lora_alpha=16"])
    rows = job.metrics
    assert [m["step"] for m in rows] == list(range(1, STEPS + 1))
    for m in rows:
        for key in ("loss/policy", "loss/value", "policy/entropy"):
            assert math.isfinite(m[key]), f"step {m['step']} {key}={m[key]}"
        assert m["rollout/logprob_gap_mean"] < 1e-4   # merged adapters reached the engine
    # The adapters move the policy: the policy entropy is not frozen at its step-1 value.
    assert len({round(m["policy/entropy"], 6) for m in rows}) > 1


def test_grpo_on_moe_adds_router_aux_loss(tmp_path, rl_job):
    job = rl_job(tmp_path / "grpo_moe", [*COMMON, "model.path=tiny:mixtral",
                                         "train.aux_loss_coef=0.01"])
    rows = job.metrics
    assert [m["step"] for m in rows] == list(range(1, STEPS + 1))
    for m in rows:
        aux = m["loss/moe_aux"]
        # Switch-style balancing loss: experts x sum(fraction x prob) >= 1 per layer.
        assert math.isfinite(aux) and aux > 0.5, f"step {m['step']} aux={aux}"
        assert math.isfinite(m["loss/policy"])
        assert m["rollout/logprob_gap_mean"] < 1e-4
