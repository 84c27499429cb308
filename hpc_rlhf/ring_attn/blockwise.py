"""Attention of one query block against one key/value block, forward and backward, plus the
log-sum-exp merge that lets a ring accumulate blocks in any order.

Pure functions of tensors (no communication). Shapes use the grouped layout
`q: [Hkv, G, Lq, D]`, `k, v: [Hkv, Lk, D]` with G = num_heads // num_kv_heads, so GQA never
materialises repeated keys. Masks come from global token positions and sample ids:
query i may see key j iff `seg[i] == seg[j] and pos[j] <= pos[i]` (causal within a sample).

Queries are processed in chunks of `q_chunk` rows and each chunk only touches the key columns
that some of its rows can see, so peak memory is O(q_chunk * Lk) per head and fully masked
(future) key ranges cost nothing.
"""
from __future__ import annotations

import torch

NEG_INF = float("-inf")


def causal_segment_mask(q_pos, q_seg, k_pos, k_seg) -> torch.Tensor:
    """[Lq, Lk] bool: True where the query may attend the key."""
    return (q_seg[:, None] == k_seg[None, :]) & (k_pos[None, :] <= q_pos[:, None])


def _visible_cols(mask: torch.Tensor) -> tuple[int, int] | None:
    """Smallest [lo, hi) column range holding every True of `mask`, or None if all False."""
    cols = mask.any(0).nonzero()
    if cols.numel() == 0:
        return None
    return int(cols[0]), int(cols[-1]) + 1


def block_forward(q, k, v, q_pos, q_seg, k_pos, k_seg, scale: float, q_chunk: int = 1024):
    """Softmax attention of q over one key block.

    q [Hkv, G, Lq, D], k/v [Hkv, Lk, D] -> out [Hkv, G, Lq, D] (normalised within the block),
    lse [Hkv, G, Lq] (log-sum-exp of the scaled scores; -inf for rows that see no key here).
    """
    out = q.new_zeros(q.shape)
    lse = q.new_full(q.shape[:-1], NEG_INF)
    for s0 in range(0, q.shape[2], q_chunk):
        s1 = min(s0 + q_chunk, q.shape[2])
        mask = causal_segment_mask(q_pos[s0:s1], q_seg[s0:s1], k_pos, k_seg)  # [c, Lk]
        span = _visible_cols(mask)
        if span is None:
            continue
        lo, hi = span
        kc, vc, mask = k[:, lo:hi], v[:, lo:hi], mask[:, lo:hi]
        scores = (q[:, :, s0:s1] @ kc.unsqueeze(1).transpose(-1, -2)) * scale  # [Hkv, G, c, k]
        scores = scores.masked_fill(~mask, NEG_INF)
        row_max = scores.amax(-1, keepdim=True)
        row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
        p = torch.exp(scores - row_max)
        denom = p.sum(-1, keepdim=True)  # [Hkv, G, c, 1]; 0 only for rows with no visible key
        out[:, :, s0:s1] = (p @ vc.unsqueeze(1)) / denom.clamp_min(torch.finfo(q.dtype).tiny)
        lse[:, :, s0:s1] = (row_max + torch.log(denom)).squeeze(-1)
    return out, lse


def merge_blocks(out_a, lse_a, out_b, lse_b):
    """Combine two partial softmax results over disjoint key sets (either may be -inf rows).

    out [..., L, D], lse [..., L] -> merged (out, lse).
    """
    top = torch.maximum(lse_a, lse_b)
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    w_a = torch.exp(lse_a - top)  # 0 where lse_a = -inf
    w_b = torch.exp(lse_b - top)
    total = w_a + w_b
    out = (w_a[..., None] * out_a + w_b[..., None] * out_b) / total.clamp_min(
        torch.finfo(total.dtype).tiny
    )[..., None]
    return out, top + torch.log(total)


def block_backward(q, k, v, dout, lse, delta, q_pos, q_seg, k_pos, k_seg, scale: float,
                   q_chunk: int = 1024):
    """Gradients of the full attention output w.r.t. q and this key block.

    q/dout [Hkv, G, Lq, D], k/v [Hkv, Lk, D], lse/delta [Hkv, G, Lq] (final log-sum-exp over
    all keys, and rowsum(dout * out)) -> dq [Hkv, G, Lq, D], dk/dv [Hkv, Lk, D].
    """
    dq = torch.zeros_like(q)
    dk = torch.zeros_like(k)
    dv = torch.zeros_like(v)
    for s0 in range(0, q.shape[2], q_chunk):
        s1 = min(s0 + q_chunk, q.shape[2])
        mask = causal_segment_mask(q_pos[s0:s1], q_seg[s0:s1], k_pos, k_seg)
        span = _visible_cols(mask)
        if span is None:
            continue
        lo, hi = span
        kc, vc, mask = k[:, lo:hi].unsqueeze(1), v[:, lo:hi].unsqueeze(1), mask[:, lo:hi]
        qc, doc = q[:, :, s0:s1], dout[:, :, s0:s1]
        scores = (qc @ kc.transpose(-1, -2)) * scale  # [Hkv, G, c, k]
        p = torch.exp(scores.masked_fill(~mask, NEG_INF) - lse[:, :, s0:s1, None])
        dv[:, lo:hi] += (p.transpose(-1, -2) @ doc).sum(1)
        dp = doc @ vc.transpose(-1, -2)  # [Hkv, G, c, k]
        ds = p * (dp - delta[:, :, s0:s1, None])
        dq[:, :, s0:s1] = (ds @ kc) * scale
        dk[:, lo:hi] += (ds.transpose(-1, -2) @ qc).sum(1) * scale
    return dq, dk, dv
