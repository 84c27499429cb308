"""Data path for ring attention: cut a packed batch into per-rank slices, gather results back.

Typical training step on every rank of a ring group:

    shard = shard_batch_for_ring(input_ids, cu_seqlens, rank, world)      # [1, L_local] each
    labels = shard.layout.shard(global_labels, rank, pad_value=-100)     # shift BEFORE sharding
    with ring_attention_scope(shard.layout, group):
        logits = model(shard.input_ids, position_ids=shard.position_ids).logits
    logp = token_logprobs(logits, labels)                                 # [1, L_local]
    full_logp = gather_from_ring(logp, shard.layout, group)               # [1, total], same on all ranks

Gradient contract of `gather_from_ring`: every rank computes the *same* loss from the gathered
tensor, so each rank keeps only the gradient of its own slice, and a parameter's full gradient
is the SUM of the ring ranks' local gradients (all-reduce SUM over the ring group, or, when the
data-parallel all-reduce averages over dp x ring ranks, multiply the loss by the ring size).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from hpc_rlhf.ring_attn.layout import RingLayout
from hpc_rlhf.ring_attn.ring import group_rank_world


@dataclass(frozen=True)
class RingShard:
    """What one rank feeds the model for one packed row."""

    layout: RingLayout
    rank: int
    input_ids: torch.Tensor  # [1, local_len]
    position_ids: torch.Tensor  # [1, local_len], position inside each sample (for RoPE)


def shard_batch_for_ring(input_ids: torch.Tensor, cu_seqlens, rank: int, world: int,
                         balanced: bool = False, pad_id: int = 0) -> RingShard:
    """Slice a packed row `input_ids` ([total] or [1, total]) for `rank` of a ring of `world`.

    `cu_seqlens` are the sample boundaries of the row ([0, ..., total], list or tensor).
    Padding (to a multiple of world, or 2*world when balanced) is appended at the end with
    `pad_id`; it forms its own sample, so it never leaks into real tokens.
    """
    if input_ids.dim() == 2:
        if input_ids.shape[0] != 1:
            raise ValueError(
                f"input_ids batch size {input_ids.shape[0]} must be 1 for ring attention; "
                "pack the samples into one row and pass cu_seqlens"
            )
        input_ids = input_ids[0]
    layout = RingLayout.from_cu_seqlens(cu_seqlens, world, balanced)
    device = input_ids.device
    return RingShard(
        layout=layout,
        rank=rank,
        input_ids=layout.shard(input_ids, rank, pad_value=pad_id).unsqueeze(0),
        position_ids=layout.position_ids(rank).to(device).unsqueeze(0),
    )


class _AllGatherOwnGrad(torch.autograd.Function):
    """all_gather along dim 0 of [L, ...]; backward keeps this rank's slice of the gradient."""

    @staticmethod
    def forward(ctx, x, group, rank, world):
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x.contiguous(), group=group)
        ctx.rank, ctx.length = rank, x.shape[0]
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad):
        start = ctx.rank * ctx.length
        return grad[start:start + ctx.length], None, None, None


def gather_from_ring(local: torch.Tensor, layout: RingLayout, group=None, dim: int = -1) -> torch.Tensor:
    """Gather every rank's slice of a per-token tensor (e.g. logprobs [1, L_local]) into the
    global order of the packed row, padding removed ([1, total]). Differentiable; see the
    module docstring for the gradient contract. Call on every rank of the group.
    """
    rank, world = group_rank_world(group)
    dim = dim % local.dim()
    if local.shape[dim] != layout.local_len:
        raise ValueError(
            f"local tensor has {local.shape[dim]} tokens on dim {dim}, expected "
            f"layout.local_len={layout.local_len}"
        )
    x = local.movedim(dim, 0)
    if world > 1:
        x = _AllGatherOwnGrad.apply(x, group, rank, world)
    return layout.unshard(x, dim=0).movedim(0, dim)
