"""Supervised token loss: pure functions of tensors (see hpc_rlhf.data.packing for layouts)."""
from __future__ import annotations

import torch


def masked_token_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """sum(values * mask) / sum(mask); 0 (with a graph) when the mask is empty."""
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp(min=1.0)


def sft_loss(token_logprobs: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """Negative log-likelihood per target token, averaged over target tokens.

    token_logprobs: [b, T] log p(token_t | tokens_<t) (any layout, padded or packed);
    loss_mask: [b, T] 1 on tokens trained on (responses / assistant turns).
    """
    return -masked_token_mean(token_logprobs, loss_mask)
