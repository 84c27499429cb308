"""Reward sources for the RL loop and multi-turn agents.

    from hpc_rlhf.rewards import build_reward_source
    source = build_reward_source(cfg)                  # cfg.reward.source: task|func|remote|model
    rewards = source.score(batch)     # batch: RewardBatch; [B] float32, finite, or RewardError

Agents (reward.source=agent): `run_agent_episodes(engine, tokenizer, load_agent_class(path), ...)`.
Reference HTTP server: `python -m hpc_rlhf.rewards.server --task arithmetic --port 0`.
"""
from hpc_rlhf.rewards.agent import Trajectory, load_agent_class, run_agent_episodes
from hpc_rlhf.rewards.base import (RewardBatch, RewardError, RewardSource, as_reward_tensor,
                                   build_reward_source, reward_batch)
from hpc_rlhf.rewards.func import FuncReward, load_reward_func
from hpc_rlhf.rewards.model import ModelReward
from hpc_rlhf.rewards.remote import RemoteReward
from hpc_rlhf.rewards.task import TaskReward

__all__ = ["FuncReward", "ModelReward", "RemoteReward", "RewardBatch", "RewardError",
           "RewardSource", "reward_batch",
           "TaskReward", "Trajectory", "as_reward_tensor", "build_reward_source",
           "load_agent_class", "load_reward_func", "run_agent_episodes"]
