"""Masked reductions shared by the RL math.

Every reduction here is NaN-free on an all-zero mask: an empty selection sums to 0 and its
mean is 0 (the denominator is clamped to 1), so a micro-batch whose rows are all padding or
env feedback yields a zero loss instead of poisoning the optimizer with NaN.
"""
from __future__ import annotations

import torch


def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Sum of `x` where `mask` is nonzero; positions outside the mask may hold NaN/inf."""
    # torch.where (not x * mask) so that garbage at masked positions (inf, NaN) never leaks.
    selected = torch.where(mask.bool(), x, torch.zeros((), dtype=x.dtype, device=x.device))
    if dim is None:
        return selected.sum()
    return selected.sum(dim=dim)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of `x` over the positions where `mask` is nonzero; 0 where nothing is selected."""
    count = mask.bool().sum() if dim is None else mask.bool().sum(dim=dim)
    return masked_sum(x, mask, dim) / count.clamp(min=1).to(x.dtype)


def last_token_index(action_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Index of the last response token of each row, and whether the row has any.

    action_mask: [batch, resp_len]. Returns (index [batch] long, has_any [batch] bool); rows
    with no response token get index 0 and has_any False.
    """
    mask = action_mask.bool()
    resp_len = mask.shape[1]
    # argmax returns the first maximum: on the flipped mask that is the last True.
    idx = resp_len - 1 - mask.flip(dims=[1]).long().argmax(dim=1)
    has_any = mask.any(dim=1)
    return torch.where(has_any, idx, torch.zeros_like(idx)), has_any
