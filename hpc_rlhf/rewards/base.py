"""The `RewardSource` seam: a batch of (query, response, label) texts in, one float per sample out.

Every source (built-in task, user reward_func.py, remote HTTP server, reward model) returns a
float32 tensor of shape [B] with finite values, or raises `RewardError` naming the source, what
went wrong and the fix. A step is never silently scored 0.

Multi-turn agents (reward.source=agent) are not a `RewardSource`: their reward comes from the
environment during the episode, so the RL loop calls `rewards.agent.run_agent_episodes` instead
of `engine.generate` + `score` (each trajectory carries its reward).
"""
from __future__ import annotations

import math
import numbers
from typing import Protocol, runtime_checkable

import torch


class RewardError(RuntimeError):
    """A reward source failed or returned something unusable (never scored as 0)."""


@runtime_checkable
class RewardSource(Protocol):
    def score(self, queries: list[str], responses: list[str], labels: list[str]) -> torch.Tensor:
        """[B] float32 finite rewards, B = len(queries) = len(responses) = len(labels)."""
        ...


def check_batch(queries, responses, labels) -> int:
    """The batch size B, after checking the three lists agree (a caller bug otherwise)."""
    sizes = (len(queries), len(responses), len(labels))
    if len(set(sizes)) != 1:
        raise ValueError(f"reward batch has {sizes[0]} queries, {sizes[1]} responses and "
                         f"{sizes[2]} labels; pass one of each per sample")
    return sizes[0]


def _short(value, limit: int = 200) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + f"... ({len(text)} chars)"


def as_reward_tensor(values, expected: int, *, source: str, fix: str) -> torch.Tensor:
    """Validate `values` (list/tuple/tensor/ndarray of numbers) into a [expected] float32 tensor.

    source: who produced them (e.g. "reward_func in /x/reward.py"); fix: how to repair it.
    """
    if isinstance(values, torch.Tensor):
        if values.dim() == 2 and values.shape[-1] == 1:  # [B, 1] is a common head output
            values = values[:, 0]
        if values.dim() != 1:
            raise RewardError(f"{source} returned a tensor of shape {tuple(values.shape)}; it "
                              f"must have shape [{expected}] (one reward per sample). {fix}")
        if values.is_floating_point() or values.dtype in (torch.int32, torch.int64, torch.bool):
            items = values.detach().cpu().double().tolist()
        else:
            raise RewardError(f"{source} returned a tensor of dtype {values.dtype}; rewards "
                              f"must be real numbers. {fix}")
    elif hasattr(values, "tolist") and hasattr(values, "shape"):  # numpy arrays
        items = values.tolist()
        if len(getattr(values, "shape", ())) != 1:
            raise RewardError(f"{source} returned an array of shape {values.shape}; it must have "
                              f"shape [{expected}]. {fix}")
    elif isinstance(values, (list, tuple)):
        items = list(values)
    else:
        raise RewardError(f"{source} returned {type(values).__name__} {_short(values)}; it must "
                          f"return a list of {expected} floats (or a 1-D tensor). {fix}")
    if len(items) != expected:
        raise RewardError(f"{source} returned {len(items)} rewards for a batch of {expected} "
                          f"samples; return exactly one reward per sample, in order. {fix}")
    out = []
    for i, v in enumerate(items):
        if isinstance(v, torch.Tensor) and v.numel() == 1:
            v = v.item()
        if isinstance(v, bool) or not isinstance(v, numbers.Real):
            raise RewardError(f"{source} returned a non-number at index {i}: {_short(v)} "
                              f"({type(v).__name__}); every reward must be a float. {fix}")
        v = float(v)
        if not math.isfinite(v):
            raise RewardError(f"{source} returned {v} at index {i}; rewards must be finite "
                              f"(no NaN or inf). {fix}")
        out.append(v)
    return torch.tensor(out, dtype=torch.float32)  # [B]


def build_reward_source(cfg) -> RewardSource:
    """The reward source `cfg.reward.source` selects (cfg: a `JobConfig`).

    task   -> TaskReward(cfg.data.prompts)          built-in verifiable tasks
    func   -> FuncReward(cfg.reward.func_path)      a user reward_func.py
    remote -> RemoteReward(cfg.reward.remote_url)   an HTTP reward server
    model  -> ModelReward(cfg.model.reward_model_path)
    agent  -> not a scorer: use rewards.agent.run_agent_episodes (raises here)
    """
    rw = cfg.reward
    if rw.source == "task":
        from hpc_rlhf.rewards.task import TaskReward
        return TaskReward(cfg.data.prompts)
    if rw.source == "func":
        from hpc_rlhf.rewards.func import FuncReward
        return FuncReward(rw.func_path)
    if rw.source == "remote":
        from hpc_rlhf.rewards.remote import RemoteReward
        return RemoteReward(rw.remote_url, timeout_s=rw.remote_timeout_s,
                            retries=rw.remote_retries)
    if rw.source == "model":
        from hpc_rlhf.rewards.model import ModelReward
        return ModelReward.from_config(cfg)
    if rw.source == "agent":
        raise ValueError("reward.source='agent' has no batch scorer: rewards come from the "
                         "agent's step() during the episode; load the class with "
                         "rewards.agent.load_agent_class(cfg.reward.agent_path) and roll out "
                         "with rewards.agent.run_agent_episodes")
    raise ValueError(f"reward.source={rw.source!r} is not one of task, func, remote, model, agent")
