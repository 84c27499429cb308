"""DAPO sample shaping: dynamic filtering of flat groups and the soft overlong penalty."""
from __future__ import annotations

import torch


def dynamic_filter_groups(
    rewards: torch.Tensor,  # [batch]
    n: int,
    mean_range: tuple[float, float] | None = None,
) -> torch.Tensor:
    """Keep mask [batch] (bool, equal for the n rows of a group) of groups that carry signal.

    A group (n consecutive rows) is kept when its rewards are not all equal (DAPO dynamic
    sampling: a flat group has zero group-relative advantage). With mean_range=(low, high) a
    group must also have low < mean reward < high (OpenRLHF's dynamic_filtering_reward_range).
    Use keep.view(-1, n)[:, 0] for the per-prompt mask.
    """
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be [batch], got shape {tuple(rewards.shape)}")
    if n < 1 or rewards.shape[0] % n != 0:
        raise ValueError(
            f"n_samples_per_prompt={n} must be >= 1 and divide batch={rewards.shape[0]}"
        )
    groups = rewards.reshape(-1, n)  # [n_prompts, n]
    keep = groups.amax(dim=1) != groups.amin(dim=1)  # [n_prompts]
    if mean_range is not None:
        low, high = mean_range
        if low >= high:
            raise ValueError(f"mean_range={mean_range} must be (low, high) with low < high")
        mean = groups.to(torch.promote_types(groups.dtype, torch.float32)).mean(dim=1)
        keep = keep & (mean > low) & (mean < high)
    return keep.repeat_interleave(n)


def overlong_penalty(
    response_lengths: torch.Tensor,  # [batch] number of generated tokens
    max_len: int,
    buffer_len: int,
    penalty_factor: float = 1.0,
) -> torch.Tensor:
    """DAPO soft overlong punishment, [batch] float, <= 0: add it to the sequence rewards.

    Responses up to max_len - buffer_len tokens get 0; beyond that the penalty grows linearly
    to -penalty_factor at max_len (and stays there for longer responses).
    """
    if buffer_len <= 0 or buffer_len > max_len:
        raise ValueError(
            f"overlong buffer_len={buffer_len} must be in (0, max_len={max_len}]"
        )
    if penalty_factor < 0:
        raise ValueError(f"overlong penalty_factor={penalty_factor} must be >= 0")
    lengths = response_lengths.to(torch.promote_types(response_lengths.dtype, torch.float32))
    exceed = (lengths - (max_len - buffer_len)).clamp(min=0, max=buffer_len)
    return -exceed / buffer_len * penalty_factor
