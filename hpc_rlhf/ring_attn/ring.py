"""Causal ring attention in pure torch (any device, gloo or NCCL).

Each rank of the sequence-parallel `group` holds the q/k/v of its tokens (see `RingLayout`).
Forward: key/value blocks travel once around the ring with point-to-point send/recv (the next
block is in flight while the current one is computed); partial results are merged with a
log-sum-exp. Backward: key/value blocks travel around again, each accompanied by its dk/dv
accumulator, which after `world` hops is back at the rank that owns the block.

Shapes: q [L, H, D], k/v [L, Hkv, D] with L = layout.local_len and H % Hkv == 0 (GQA).
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from hpc_rlhf.ring_attn.blockwise import block_backward, block_forward, merge_blocks
from hpc_rlhf.ring_attn.layout import RingLayout


def group_rank_world(group) -> tuple[int, int]:
    """(rank, world) inside `group`; (0, 1) when torch.distributed is not initialised."""
    if group is None and not (dist.is_available() and dist.is_initialized()):
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


class _RingPeers:
    """Point-to-point exchange with the ring neighbours of this rank."""

    def __init__(self, group, rank: int, world: int):
        self.group = group
        g = group if group is not None else dist.group.WORLD
        self.next = dist.get_global_rank(g, (rank + 1) % world)
        self.prev = dist.get_global_rank(g, (rank - 1) % world)

    def shift(self, tensor: torch.Tensor, tag: int):
        """Start sending `tensor` to next and receiving prev's; returns (buffer, wait)."""
        tensor = tensor.contiguous()
        buf = torch.empty_like(tensor)
        reqs = [
            dist.isend(tensor, self.next, group=self.group, tag=tag),
            dist.irecv(buf, self.prev, group=self.group, tag=tag),
        ]

        def wait():
            for r in reqs:
                r.wait()
            return buf

        return wait


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _grouped(x: torch.Tensor, kv_heads: int, dtype) -> torch.Tensor:
    """[L, H, D] -> [Hkv, G, L, D]."""
    L, H, D = x.shape
    return x.to(dtype).reshape(L, kv_heads, H // kv_heads, D).permute(1, 2, 0, 3)


def _ungrouped(x: torch.Tensor) -> torch.Tensor:
    """[Hkv, G, L, D] -> [L, H, D]."""
    Hkv, G, L, D = x.shape
    return x.permute(2, 0, 1, 3).reshape(L, Hkv * G, D)


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, layout: RingLayout, group, scale: float, q_chunk: int):
        rank, world = group_rank_world(group)
        peers = _RingPeers(group, rank, world) if world > 1 else None
        cdt = _compute_dtype(q.dtype)
        kv_heads = k.shape[1]
        qg = _grouped(q, kv_heads, cdt)  # [Hkv, G, L, D]
        q_pos, q_seg = layout.token_index(rank).to(q.device), layout.segment_ids(rank).to(q.device)

        kv = torch.stack([k, v])  # [2, L, Hkv, D], travels in the input dtype
        out = lse = None
        for step in range(world):
            src = (rank - step) % world
            wait = peers.shift(kv, tag=0) if step < world - 1 else None
            kb = kv[0].to(cdt).permute(1, 0, 2)  # [Hkv, L, D]
            vb = kv[1].to(cdt).permute(1, 0, 2)
            k_pos, k_seg = layout.token_index(src).to(q.device), layout.segment_ids(src).to(q.device)
            o_b, lse_b = block_forward(qg, kb, vb, q_pos, q_seg, k_pos, k_seg, scale, q_chunk)
            out, lse = (o_b, lse_b) if out is None else merge_blocks(out, lse, o_b, lse_b)
            if wait is not None:
                kv = wait()

        ctx.save_for_backward(q, k, v, out, lse)
        ctx.layout, ctx.group, ctx.scale, ctx.q_chunk = layout, group, scale, q_chunk
        return _ungrouped(out).to(q.dtype)

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        layout, group, scale, q_chunk = ctx.layout, ctx.group, ctx.scale, ctx.q_chunk
        rank, world = group_rank_world(group)
        peers = _RingPeers(group, rank, world) if world > 1 else None
        cdt = out.dtype
        kv_heads = k.shape[1]
        qg = _grouped(q, kv_heads, cdt)
        dog = _grouped(dout, kv_heads, cdt)  # [Hkv, G, L, D]
        delta = (dog * out).sum(-1)  # [Hkv, G, L]
        q_pos, q_seg = layout.token_index(rank).to(q.device), layout.segment_ids(rank).to(q.device)

        dq = torch.zeros_like(qg)
        kv = torch.stack([k, v])
        dkv = torch.zeros(kv.shape, dtype=cdt, device=kv.device)  # accumulator of block `src`
        dkv_wait = None
        for step in range(world):
            src = (rank - step) % world
            kv_wait = peers.shift(kv, tag=1) if step < world - 1 else None
            kb = kv[0].to(cdt).permute(1, 0, 2)
            vb = kv[1].to(cdt).permute(1, 0, 2)
            k_pos, k_seg = layout.token_index(src).to(q.device), layout.segment_ids(src).to(q.device)
            dq_b, dk_b, dv_b = block_backward(
                qg, kb, vb, dog, lse, delta, q_pos, q_seg, k_pos, k_seg, scale, q_chunk
            )
            dq += dq_b
            if dkv_wait is not None:  # the accumulator of `src`, sent by prev after its step
                dkv = dkv_wait()
            dkv[0] += dk_b.permute(1, 0, 2)
            dkv[1] += dv_b.permute(1, 0, 2)
            if world > 1:  # hand it on; after `world` hops it is home
                dkv_wait = peers.shift(dkv, tag=2)
            if kv_wait is not None:
                kv = kv_wait()
        if dkv_wait is not None:
            dkv = dkv_wait()
        dq = _ungrouped(dq).to(q.dtype)
        return dq, dkv[0].to(k.dtype), dkv[1].to(v.dtype), None, None, None, None


def ring_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: RingLayout,
                   group=None, scale: float | None = None, q_chunk: int = 1024) -> torch.Tensor:
    """Causal attention of this rank's queries over every earlier token of the same sample,
    wherever in the ring it lives. q [L, H, D], k/v [L, Hkv, D] -> [L, H, D].

    `group` is the sequence-parallel process group (None: the default group, or a single
    process when torch.distributed is not initialised). Call it on every rank of the group.
    """
    rank, world = group_rank_world(group)
    if layout.world != world:
        raise ValueError(
            f"layout.world={layout.world} but the process group has {world} ranks; build the "
            "RingLayout with world = ring_attn_size of this group"
        )
    L, H, D = q.shape
    if k.shape != v.shape or k.shape[0] != L or k.shape[2] != D or H % k.shape[1]:
        raise ValueError(
            f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}: expected q [L, H, D] "
            "and k, v [L, Hkv, D] with H divisible by Hkv"
        )
    if L != layout.local_len:
        raise ValueError(
            f"local sequence length {L} != layout.local_len={layout.local_len}; shard inputs with "
            "RingLayout.shard / shard_batch_for_ring so every rank holds local_len tokens"
        )
    scale = D ** -0.5 if scale is None else float(scale)
    return _RingAttention.apply(q, k, v, layout, group, scale, q_chunk)
