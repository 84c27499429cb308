"""Async rollout (disaggregated, staleness 1, TIS) and multi-turn agent episodes, end to end."""
import math

import pytest

DISAGG = ("topology.mode=disaggregated", "topology.nodes=1", "topology.procs_per_node=4",
          "rollout.num_engines=1", "rollout.prompts_per_step=6", "rollout.n_samples_per_prompt=2",
          "train.batch_size=6", "train.micro_batch_size=2")


@pytest.mark.e2e
@pytest.mark.distributed
@pytest.mark.vllm
@pytest.mark.deepspeed
def test_async_rollout_runs_one_step_stale_with_tis(tmp_path, rl_job):
    job = rl_job(tmp_path / "async", [*DISAGG, "rollout.async_steps=1", "algorithm.off_policy=tis",
                                   "train.num_steps=4"], nproc=4, timeout_s=420)
    rows = job.metrics
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    # Step 1 is generated with the initial weights (on time); every later step was generated
    # while the trainers were still on the step before: one step stale.
    assert [r["rollout/staleness"] for r in rows] == [0.0, 1.0, 1.0, 1.0]
    # Stale rollouts differ from the trainer's policy; the TIS weights see the difference
    # (mean importance ratio != 1) but stay close to it for such small updates.
    assert rows[0]["rollout/logprob_gap_mean"] < 1e-4
    assert all(r["rollout/logprob_gap_mean"] > 1e-6 for r in rows[1:])
    assert all(abs(r["policy/rollout_is_mean"] - 1.0) < 0.5 for r in rows)


@pytest.mark.e2e
@pytest.mark.vllm
@pytest.mark.deepspeed
def test_multi_turn_agent_episodes_train(tmp_path, rl_job):
    """GuessNumberAgent (examples/agent_example.py) on arithmetic prompts: the environment's
    "Higher."/"Lower." turns are part of each sequence but masked out of the loss."""
    job = rl_job(tmp_path / "agent", ["data.prompts=task:arithmetic", "reward.source=agent",
                                   "reward.agent_path=examples/agent_example.py:GuessNumberAgent",
                                   "reward.max_turns=3", "rollout.max_new_tokens=4",
                                   "train.num_steps=2"], timeout_s=300)
    rows = job.metrics
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        assert 0.0 <= r["reward/mean"] <= 1.0
        assert r["rollout/logprob_gap_mean"] < 1e-4  # env tokens are not compared
        assert math.isfinite(r["loss/policy"]), r  # NaN and +-inf both fail
    # A random tiny model rarely guesses right, so most episodes use all 3 turns: the
    # trained tokens (model turns only) stay within 3 x max_new_tokens per episode.
    assert all(r["rollout/response_len"] <= 12 for r in rows)


OPENRLHF_AGENT = '''
import torch
from openrlhf.utils.agent import AgentInstanceBase

class AgentInstance(AgentInstanceBase):
    async def __init__(self, *args, **kwargs):
        self.turn = 0

    async def reset(self, states, **kwargs):
        return {"observation": states["observation"]}

    async def step(self, states, **kwargs):
        self.turn += 1
        done = self.turn == 2
        right = states["action_text"].strip().startswith(states["label"])
        return {"rewards": torch.tensor(0.5 * right + (0.25 if done else 0.0)),
                "scores": torch.tensor(float(right)), "done": done,
                "environment_feedback": "" if done else "\\nOnce more:\\n"}
'''


@pytest.mark.e2e
@pytest.mark.deepspeed
def test_openrlhf_agent_file_trains_two_turn_episodes(tmp_path, rl_job):
    """An agent file written for OpenRLHF (async state-dict interface, its import served by the
    stand-in module) runs in an RL job: every episode takes exactly two turns and its reward is
    the sum over them (0.25 for finishing, + 0.5 per turn that starts with the label)."""
    path = tmp_path / "agent_func.py"
    path.write_text(OPENRLHF_AGENT)
    job = rl_job(tmp_path / "agent", ["rollout.engine=hf", "data.prompts=task:arithmetic",
                                      "reward.source=agent", f"reward.agent_path={path}",
                                      "reward.max_turns=4", "rollout.max_new_tokens=4",
                                      "train.num_steps=2"], timeout_s=300)
    rows = job.metrics
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        assert 0.25 <= r["reward/mean"] <= 1.25
        assert math.isfinite(r["loss/policy"]), r
        # two model turns of at most 4 tokens: the env's tokens are not counted
        assert r["rollout/response_len"] <= 8
