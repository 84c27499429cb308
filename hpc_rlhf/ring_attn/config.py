"""Ring attention settings and the one call a trainer makes per packed micro-batch."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from hpc_rlhf.ring_attn.backend import BACKENDS
from hpc_rlhf.ring_attn.hf_attention import ring_attention_scope
from hpc_rlhf.ring_attn.ring import group_rank_world
from hpc_rlhf.ring_attn.sharding import gather_from_ring, shard_batch_for_ring

LAYOUTS = ("contiguous", "balanced")


@dataclass(frozen=True)
class RingAttnConfig:
    """Sequence parallelism over a ring of ranks (1 = off)."""

    size: int = 1  # ranks per ring (ring_attn_size); the sequence is split across them
    layout: str = "contiguous"  # "contiguous" slices, or "balanced" (zigzag, equal causal work)
    backend: str = "auto"  # "auto": ring-flash-attn on CUDA when usable, else pure torch
    q_chunk: int = 1024  # query rows per tile in the torch kernel (peak memory ~ q_chunk * L)

    def __post_init__(self):
        if self.size < 1:
            raise ValueError(f"ring_attn.size={self.size} must be >= 1 (1 disables ring attention)")
        if self.layout not in LAYOUTS:
            raise ValueError(f"ring_attn.layout={self.layout!r} must be one of {LAYOUTS}")
        if self.backend not in BACKENDS:
            raise ValueError(f"ring_attn.backend={self.backend!r} must be one of {BACKENDS}")
        if self.q_chunk < 1:
            raise ValueError(f"ring_attn.q_chunk={self.q_chunk} must be >= 1 (try 1024)")

    @property
    def balanced(self) -> bool:
        return self.layout == "balanced"


def ring_forward(model, input_ids: torch.Tensor, cu_seqlens, group, cfg: RingAttnConfig,
                 per_token: Callable, **model_kwargs) -> torch.Tensor:
    """Run `model` on this rank's slice of one packed row and gather a per-token result.

    input_ids: [1, total] (or [total]) global packed row, the same on every rank of the ring.
    per_token(output, shard) -> [1, L_local, ...] (this rank's tokens, in shard order) from the
    model output. Returns [1, total, ...] in global order, identical on every ring rank and
    differentiable (gradient contract of `gather_from_ring`). `model_kwargs` go to the forward
    (e.g. use_cache=False for a causal LM). The model must use attn_implementation "ring".
    """
    rank, world = group_rank_world(group)
    if world != cfg.size:
        raise ValueError(f"ring_attn.size={cfg.size} but the ring group has {world} ranks")
    shard = shard_batch_for_ring(input_ids, cu_seqlens, rank, world, balanced=cfg.balanced)
    with ring_attention_scope(shard.layout, group, cfg.backend, cfg.q_chunk):
        out = model(input_ids=shard.input_ids, position_ids=shard.position_ids, **model_kwargs)
    return gather_from_ring(per_token(out, shard), shard.layout, group, dim=1)


def ring_token_logprobs(model, input_ids: torch.Tensor, labels: torch.Tensor, cu_seqlens,
                        group, cfg: RingAttnConfig, temperature: float = 1.0) -> torch.Tensor:
    """log p(labels) of one packed row, computed with the sequence split over `group`.

    input_ids/labels: [1, total] global packed row on every rank of the ring (labels already
    shifted inside each sample, -100 where none). The model must use attn_implementation
    "ring" (enable_ring_attention). Returns [1, total] logprobs (0 at -100), identical on every
    rank and differentiable; the gradient contract is that of `gather_from_ring`.
    """
    def per_token(out, shard):
        local_labels = shard.layout.shard(labels.reshape(-1), shard.rank, pad_value=-100)[None]
        logits = out.logits
        if logits.dtype in (torch.float16, torch.bfloat16):
            logits = logits.float()
        logits = logits / temperature  # [1, L_local, V]
        valid = local_labels != -100
        logp = logits.log_softmax(-1).gather(-1, local_labels.clamp_min(0).unsqueeze(-1))
        return logp.squeeze(-1) * valid  # [1, L_local]

    return ring_forward(model, input_ids, cu_seqlens, group, cfg, per_token, use_cache=False)
