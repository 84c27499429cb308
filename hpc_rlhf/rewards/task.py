"""Rewards of the built-in verifiable tasks (hpc_rlhf.data.tasks), as a batched `RewardSource`."""
from __future__ import annotations

import torch

from hpc_rlhf.data.tasks import task_name, task_reward
from hpc_rlhf.rewards.base import RewardBatch, as_reward_tensor


class TaskReward:
    """Scores responses of `task:<name>` prompts against their labels; prompts are unused."""

    def __init__(self, task: str):
        self.task = task_name(task)          # raises a clear error for unknown tasks
        self._reward = task_reward(self.task)

    def score(self, batch: RewardBatch) -> torch.Tensor:
        values = [self._reward(r, lab) for r, lab in zip(batch.responses, batch.labels)]
        return as_reward_tensor(values, len(batch), source=f"task {self.task!r}",
                                fix="(a bug in hpc_rlhf.data.tasks)")

    def __repr__(self) -> str:
        return f"TaskReward({self.task!r})"
