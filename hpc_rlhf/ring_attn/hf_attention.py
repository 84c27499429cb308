"""Ring attention as a Hugging Face attention implementation named "ring".

transformers (>= 4.48, checked on 5.19) looks attention up by `config._attn_implementation` in
`AttentionInterface`; every model built on that interface (Llama, Qwen2/2.5/3, Mistral, ...)
then runs ring attention with no code change. The per-batch state the kernel needs (layout of
the packed row, process group, backend) is set for the duration of a forward by
`ring_attention_scope`; backward needs no scope (the autograd node keeps it).

    register_ring_attention()
    model.set_attn_implementation("ring")      # or enable_ring_attention(model)
    with ring_attention_scope(shard.layout, group):
        out = model(shard.input_ids, position_ids=shard.position_ids)

The model sees this rank's tokens with their in-sample position ids, so RoPE is right; the
mask that HF would build for the local slice is skipped ("ring" mask function returns None),
because the kernel masks by global position and sample from the layout.
"""
from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass

import torch

from hpc_rlhf.ring_attn.backend import flash_ring_attention, log_choice, select_backend
from hpc_rlhf.ring_attn.layout import RingLayout
from hpc_rlhf.ring_attn.ring import ring_attention

RING_ATTN_NAME = "ring"


@dataclass(frozen=True)
class RingScope:
    layout: RingLayout
    group: object  # torch.distributed ProcessGroup or None (default group)
    backend: str = "auto"  # "auto" | "torch" | "flash"
    q_chunk: int = 1024  # query rows per block in the torch kernel (memory/speed knob)


_SCOPE: contextvars.ContextVar[RingScope | None] = contextvars.ContextVar("ring_scope", default=None)


@contextlib.contextmanager
def ring_attention_scope(layout: RingLayout, group=None, backend: str = "auto", q_chunk: int = 1024):
    """Make "ring" attention layers use `layout`/`group` for forwards inside the block."""
    token = _SCOPE.set(RingScope(layout, group, backend, q_chunk))
    try:
        yield
    finally:
        _SCOPE.reset(token)


def ring_attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0,
                           scaling: float | None = None, **kwargs):
    """HF attention-interface function. query [1, H, L, D], key/value [1, Hkv, L, D] (RoPE
    already applied) -> (out [1, L, H, D], None)."""
    scope = _SCOPE.get()
    if scope is not None:
        module._ring_scope = scope  # for activation-checkpoint recompute, see _scope_in_backward
    else:
        scope = _scope_in_backward(module)
    if scope is None:
        raise RuntimeError(
            "attn_implementation='ring' needs an active ring_attention_scope(layout, group) "
            "around the model forward (hpc_rlhf.ring_attn.ring_attention_scope)"
        )
    if query.shape[0] != 1:
        raise ValueError(
            f"ring attention takes one packed row, got batch size {query.shape[0]}; pack the "
            "micro-batch (shard_batch_for_ring) before the forward"
        )
    if dropout and module.training:
        raise ValueError(f"attention dropout={dropout} is not supported by ring attention; set it to 0")
    if kwargs.get("sliding_window") is not None:
        raise ValueError(
            f"sliding_window={kwargs['sliding_window']} attention is not supported by ring "
            "attention; disable it in the model config (e.g. use_sliding_window=False)"
        )
    if kwargs.get("past_key_values") is not None or key.shape[2] != query.shape[2]:
        raise ValueError("ring attention is for training/scoring full sequences, not cached decoding")
    q = query[0].transpose(0, 1)  # [L, H, D]
    k = key[0].transpose(0, 1)  # [L, Hkv, D]
    v = value[0].transpose(0, 1)
    choice = select_backend(scope.backend, q.device, scope.layout)
    log_choice(choice)
    if choice.name == "flash":
        out = flash_ring_attention(q, k, v, scope.layout, scope.group, scaling)
    else:
        out = ring_attention(q, k, v, scope.layout, scope.group, scaling, scope.q_chunk)
    return out.unsqueeze(0), None  # [1, L, H, D]


def _scope_in_backward(module) -> RingScope | None:
    """Gradient checkpointing re-runs the forward inside backward, after the `with
    ring_attention_scope` block has exited: reuse the scope of this layer's last forward then
    (and only then, so a plain forward outside any scope still fails loudly)."""
    if torch._C._current_graph_task_id() == -1:  # not inside an autograd backward
        return None
    return getattr(module, "_ring_scope", None)


def _no_mask(*args, **kwargs):
    return None


def register_ring_attention() -> str:
    """Register "ring" with transformers' attention and mask interfaces (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(RING_ATTN_NAME, ring_attention_forward)
    AttentionMaskInterface.register(RING_ATTN_NAME, _no_mask)
    return RING_ATTN_NAME


def enable_ring_attention(model: torch.nn.Module) -> torch.nn.Module:
    """Register "ring" and switch a loaded HF model to it (all its attention layers)."""
    register_ring_attention()
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(RING_ATTN_NAME)
    else:
        model.config._attn_implementation = RING_ATTN_NAME
    return model
