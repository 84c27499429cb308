"""RingAttention sequence parallelism: one packed sequence split across a ring of ranks.

Public API:
    RingLayout                 which tokens each rank holds (contiguous or balanced/zigzag)
    ring_attention             causal varlen ring attention, pure torch, autograd (q [L,H,D])
    select_backend             "flash" (ring-flash-attn on CUDA) or "torch", with a reason
    shard_batch_for_ring       packed row -> this rank's input_ids / position_ids
    gather_from_ring           per-token tensors (logprobs) back to the global order
    register_ring_attention    register attn_implementation="ring" with transformers
    enable_ring_attention      register and switch a model to "ring"
    ring_attention_scope       per-forward context: layout, group, backend
    run_local_ring             spawn a local gloo ring (tests, benchmarks)
    RingAttnConfig             size / layout / backend / q_chunk (frozen, validated)
    ring_token_logprobs        shard -> model forward in scope -> gathered logprobs [1, total]
    ring_forward               the same for any per-token output (values, scores, entropies)

Heavy deps stay lazy: transformers is imported by register_ring_attention, ring_flash_attn by
hpc_rlhf.ring_attn.backend only when selected.
"""
from hpc_rlhf.ring_attn.backend import BackendChoice, select_backend
from hpc_rlhf.ring_attn.config import RingAttnConfig, ring_forward, ring_token_logprobs
from hpc_rlhf.ring_attn.hf_attention import (
    RING_ATTN_NAME,
    enable_ring_attention,
    register_ring_attention,
    ring_attention_forward,
    ring_attention_scope,
)
from hpc_rlhf.ring_attn.layout import RingLayout
from hpc_rlhf.ring_attn.local_ring import run_local_ring
from hpc_rlhf.ring_attn.ring import ring_attention
from hpc_rlhf.ring_attn.sharding import RingShard, gather_from_ring, shard_batch_for_ring

__all__ = [
    "BackendChoice",
    "RING_ATTN_NAME",
    "RingAttnConfig",
    "RingLayout",
    "RingShard",
    "enable_ring_attention",
    "gather_from_ring",
    "register_ring_attention",
    "ring_attention",
    "ring_attention_forward",
    "ring_attention_scope",
    "ring_forward",
    "ring_token_logprobs",
    "run_local_ring",
    "select_backend",
    "shard_batch_for_ring",
]
