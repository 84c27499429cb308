"""RingAttention in the RL step (hpc_rlhf/recipes/rl/step.py): padded rollout batches through
the ring.

The RL batch is padded ([B, P + R], prompt left-padded, response right-padded; see
recipes/rl/experience.py). Under a ring (ring_common.py):

1. `gather_ring_batch`: the rollouts of a step are split over ALL trainer ranks (prompt
   sharding is per rank), so the ring's members first all-gather their rows; every member then
   holds the ring's batch (the data of dp rank = rank // (autotp x ring)) in member order.
2. each micro-batch's real tokens (attention_mask 1) are packed into one row and run through
   the ring (`ring_forward`); per-token logprobs / entropies / values are gathered and put
   back in the [b, R] response layout. Columns with no real response token hold 0 (the caller
   masks them with action_mask, as it masks the padded path's garbage there).
3. the loss (identical on every ring rank) is backpropagated x ring (`ring_common.scaled`).

Where the ring comes from: a launched job's recipe calls `setup_rl_ring(cfg, topo)` once, so the
topology's ring groups are used; without that call (tests, scripts on a plain default world)
the first step builds them with new_ring_group. Either way the ring is cached per default group,
and the actor, ref and critic models are switched to ring attention on first use.
"""
from __future__ import annotations

from dataclasses import fields, replace

import torch
import torch.distributed as dist

from hpc_rlhf.engine.logprobs import entropy_from_logits, logprobs_from_logits
from hpc_rlhf.engine.ring_common import Ring, enable_ring, ring_setup
from hpc_rlhf.ring_attn import ring_forward
from hpc_rlhf.topology import collectives

_CACHE: dict = {}  # "ring" -> (default group, size, autotp, Ring)


def setup_rl_ring(cfg, topo) -> None:
    """Use the topology's ring groups (`topo.sp_group`) for the RL step; no-op at ring size 1."""
    t = cfg.train
    if t.ring_attn_size > 1:
        world = dist.distributed_c10d._get_default_group()
        ring = ring_setup(t, topo)
        _CACHE["ring"] = (world, t.ring_attn_size, t.autotp_size, ring)
        if dist.get_rank() == 0:
            print(f"[rl] RingAttention: {ring.dp_size} ring(s) of {ring.cfg.size} ranks, "
                  "sequences split across each ring", flush=True)


def rl_ring(cfg, models) -> Ring | None:
    """The ring of `cfg.train.ring_attn_size` (None at 1), its models switched to "ring".
    Collective the first time (every trainer rank must call it at the same point)."""
    t = cfg.train
    if t.ring_attn_size == 1:
        return None
    world = dist.distributed_c10d._get_default_group() if dist.is_initialized() else None
    cached = _CACHE.get("ring")
    if cached is None or cached[0] is not world or cached[1:3] != (t.ring_attn_size,
                                                                 t.autotp_size):
        _CACHE["ring"] = (world, t.ring_attn_size, t.autotp_size, ring_setup(t))
    for model in (models.actor, models.ref, models.critic):
        if model is not None:
            enable_ring(model)
    return _CACHE["ring"][3]


# ---- the ring's batch ---------------------------------------------------------------------
def _pad_cols(t: torch.Tensor, width: int, left: bool) -> torch.Tensor:
    extra = width - t.shape[1]
    if extra == 0:
        return t
    pad = t.new_zeros((t.shape[0], extra) + tuple(t.shape[2:]))
    return torch.cat([pad, t] if left else [t, pad], dim=1)


def concat_batches(batches: list):
    """Stack padded RL batches (experience.Batch) of different widths: prompt parts padded on
    the left, response parts on the right (pad token 0, masked by attention_mask)."""
    R = max(b.response_len for b in batches)
    P = max(b.input_ids.shape[1] - b.response_len for b in batches)
    parts = {}
    for f in fields(batches[0]):
        vals = [getattr(b, f.name) for b in batches]
        if vals[0] is None:
            parts[f.name] = None
        elif vals[0].dim() == 1:
            parts[f.name] = torch.cat(vals)
        elif vals[0].shape[1] == batches[0].input_ids.shape[1]:  # [B, P + R]
            rows = []
            for v, b in zip(vals, batches):
                split = v.shape[1] - b.response_len  # this batch's prompt width
                rows.append(torch.cat([_pad_cols(v[:, :split], P, True),
                                       _pad_cols(v[:, split:], R, False)], 1))
            parts[f.name] = torch.cat(rows)
        else:  # response-shaped [B, R]
            parts[f.name] = torch.cat([_pad_cols(v, R, False) for v in vals])
    return replace(batches[0], **parts)


def gather_ring_batch(batch, ring: Ring | None):
    """Every ring member's rows, concatenated in member order (the ring's batch); identity
    without a ring. Collective over the ring."""
    if ring is None:
        return batch
    return concat_batches(collectives.gather_objects(batch, ring.group))


# ---- padded micro-batch <-> one packed row --------------------------------------------------
def packed_response_index(attention_mask: torch.Tensor, response_len: int):
    """Where each response column's *predicting position* lies in the packed row.

    attention_mask [b, T] (real tokens contiguous per row) -> (keep [b, T] bool, cu_seqlens
    list, index [b, r] long into the packed row, valid [b, r] bool). Response token at column
    c = T - r + j of row i is predicted at column c - 1, packed at cu[i] + c - 1 - first[i].
    """
    keep = attention_mask.bool()
    b, T = keep.shape
    lengths = keep.sum(1)  # [b]
    first = keep.long().argmax(1)  # [b] first real column
    cu = torch.cat([lengths.new_zeros(1), lengths.cumsum(0)])  # [b + 1]
    cols = torch.arange(T - response_len, T, device=keep.device)[None, :]  # [1, r]
    valid = cols < (first + lengths)[:, None]  # a real response token
    index = cu[:-1, None] + cols - 1 - first[:, None]
    index = torch.where(valid, index, torch.zeros_like(index))
    return keep, cu.tolist(), index, valid


def _to_response(per_pos: torch.Tensor, index: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """per_pos [total] -> [b, r] (0 where not valid)."""
    return per_pos[index] * valid


def ring_response_logprobs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                           response_len: int, ring: Ring, temperature: float = 1.0, *,
                           entropy: str | None = None):
    """Ring version of train.logprobs.response_logprobs: [b, r] float32 log p(response token).

    entropy: None, "grad" (differentiable) or "detached": also return the entropy [b, r] of
    softmax(logits / temperature) at each predicting position.
    """
    keep, cu, index, valid = packed_response_index(attention_mask, response_len)
    row = input_ids[keep][None]  # [1, total]
    labels = torch.full_like(row, -100)
    labels[:, :-1] = row[:, 1:]
    labels[0, torch.tensor(cu[1:], device=row.device) - 1] = -100

    def per_token(out, shard):  # [1, L_local, 1 or 2]
        local = shard.layout.shard(labels[0], shard.rank, pad_value=-100)[None]
        logits = out.logits  # [1, L_local, V]
        lp = logprobs_from_logits(logits, local.clamp_min(0), temperature) * (local != -100)
        cols = [lp]
        if entropy == "grad":
            cols.append(entropy_from_logits(logits, temperature))
        elif entropy == "detached":
            with torch.no_grad():
                cols.append(entropy_from_logits(logits.detach(), temperature))
        return torch.stack(cols, -1)

    got = ring_forward(model, row, cu, ring.group, ring.cfg, per_token, use_cache=False)[0]
    logp = _to_response(got[:, 0], index, valid)  # [b, r]
    if entropy is None:
        return logp
    return logp, _to_response(got[:, 1], index, valid)


def ring_response_values(critic, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                         response_len: int, ring: Ring) -> torch.Tensor:
    """Ring version of models.heads.response_values: [b, r] V(state before response token)."""
    keep, cu, index, valid = packed_response_index(attention_mask, response_len)
    row = input_ids[keep][None]
    got = ring_forward(critic, row, cu, ring.group, ring.cfg,
                       lambda out, shard: out, attention_mask=None)[0]  # [total]
    return _to_response(got, index, valid)
