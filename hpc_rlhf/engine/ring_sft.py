"""SFT with RingAttention sequence parallelism (`train.ring_attn_size > 1`).

The ring itself (groups, data coordinates, the loss scaling that undoes DeepSpeed's averaging
over ring ranks) is shared by every trainer and lives in ring_common.py; this module holds the
SFT micro-batch: all samples packed into one row, next-token labels, the loss.
"""
from __future__ import annotations

import torch

from hpc_rlhf.algos.losses_sft import sft_loss
from hpc_rlhf.data import TokenBatch, sft_batch
from hpc_rlhf.engine.ring_common import (Ring, new_ring_group, ring_dp_coords, ring_group_ranks,
                                         ring_setup)
from hpc_rlhf.ring_attn import ring_token_logprobs

RingSFT = Ring  # the name sft.py and older callers use
ring_sft_setup = ring_setup

__all__ = ["RingSFT", "new_ring_group", "next_token_labels", "one_row_batch", "ring_dp_coords",
           "ring_group_ranks", "ring_sft_loss", "ring_sft_setup"]


# ---- one micro-batch ----------------------------------------------------------------------
def one_row_batch(samples, pad_id: int) -> tuple[TokenBatch, list[int]]:
    """All samples of a micro-batch packed back to back in one row, and its cu_seqlens."""
    lengths = [len(s.input_ids) for s in samples]
    batch = sft_batch(samples, pad_id=pad_id, packing=True, row_capacity=sum(lengths))
    cu = [0]
    for n in lengths:
        cu.append(cu[-1] + n)
    return batch, cu  # batch tensors [1, total]


def next_token_labels(batch: TokenBatch) -> torch.Tensor:
    """labels[t] = input_ids[t + 1] where token t + 1 is a target, else -100. [1, total]"""
    ids, mask = batch.input_ids, batch.loss_mask  # [1, T]
    labels = torch.full_like(ids, -100)
    labels[:, :-1] = torch.where(mask[:, 1:] > 0, ids[:, 1:], -100)
    return labels


def ring_sft_loss(model, samples, *, pad_id: int, ring: RingSFT, device) -> torch.Tensor:
    """Unscaled SFT loss of one micro-batch (equal on every rank of the ring)."""
    batch, cu = one_row_batch(samples, pad_id)
    batch = batch.to(device)
    lp = ring_token_logprobs(model, batch.input_ids, next_token_labels(batch), cu, ring.group,
                             ring.cfg)  # [1, T]: logp of token t + 1 at t
    # TokenBatch convention: the logprob of target token t sits at t (column 0 is never a target)
    token_lp = torch.nn.functional.pad(lp[:, :-1], (1, 0))  # [1, T]
    return sft_loss(token_lp, batch.loss_mask)
