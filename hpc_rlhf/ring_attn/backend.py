"""Choose the ring attention kernel at run time: ring-flash-attn on GPU when it works, else
the pure torch ring (hpc_rlhf.ring_attn.ring). This is the only module that imports
ring_flash_attn (lazily).

ring-flash-attn needs flash-attn and, at import time, patches into transformers internals
that transformers 5.x removed, so "installed" does not mean "usable": the import is tried and
any failure becomes the logged reason for the fallback.
"""
from __future__ import annotations

import functools
import logging
from dataclasses import dataclass

import torch

from hpc_rlhf.ring_attn.layout import RingLayout

log = logging.getLogger(__name__)

BACKENDS = ("auto", "torch", "flash")


@dataclass(frozen=True)
class BackendChoice:
    name: str  # "torch" or "flash"
    reason: str  # why, in words (logged once)


@functools.lru_cache(maxsize=None)
def _import_ring_flash_attn():
    """(module, None) or (None, reason)."""
    try:
        import ring_flash_attn  # noqa: F401  (needs flash_attn; imports transformers internals)
    except Exception as e:  # ImportError, or AttributeError/TypeError from a transformers mismatch
        return None, f"import ring_flash_attn failed: {type(e).__name__}: {e}"
    missing = [n for n in ("llama3_flash_attn_prepare_cu_seqlens", "llama3_flash_attn_varlen_func")
               if not hasattr(ring_flash_attn, n)]
    if missing:
        return None, f"ring_flash_attn {getattr(ring_flash_attn, '__version__', '?')} lacks {missing}"
    return ring_flash_attn, None


def select_backend(requested: str = "auto", device: torch.device | str | None = None,
                   layout: RingLayout | None = None) -> BackendChoice:
    """Pick the kernel. `requested` is "auto", "torch" or "flash" ("flash" raises if unusable)."""
    if requested not in BACKENDS:
        raise ValueError(f"ring_attn backend={requested!r} must be one of {BACKENDS}")
    if requested == "torch":
        return BackendChoice("torch", "requested")
    reason = None
    dev = torch.device(device) if device is not None else None
    if not torch.cuda.is_available() or (dev is not None and dev.type != "cuda"):
        reason = "flash needs CUDA tensors"
    elif layout is not None and layout.balanced:
        reason = "ring-flash-attn's varlen (llama3) kernel needs the contiguous layout, not balanced"
    else:
        _, reason = _import_ring_flash_attn()
    if reason is None:
        return BackendChoice("flash", "ring_flash_attn imported and CUDA available")
    if requested == "flash":
        raise RuntimeError(f"ring_attn backend='flash' is not usable: {reason}; use backend='auto'")
    return BackendChoice("torch", reason)


_logged: set[str] = set()


def log_choice(choice: BackendChoice) -> None:
    key = f"{choice.name}:{choice.reason}"
    if key not in _logged:
        _logged.add(key)
        log.info("ring attention backend: %s (%s)", choice.name, choice.reason)


def flash_ring_attention(q, k, v, layout: RingLayout, group, scale: float | None = None):
    """ring-flash-attn's llama3 varlen kernel over the contiguous layout.
    q [L, H, D], k/v [L, Hkv, D] (CUDA, fp16/bf16) -> [L, H, D]."""
    rfa, reason = _import_ring_flash_attn()
    if rfa is None:
        raise RuntimeError(f"ring_flash_attn unusable: {reason}")
    import torch.distributed as dist

    rank, world = dist.get_rank(group), dist.get_world_size(group)
    cu = torch.tensor(layout.padded_cu_seqlens, dtype=torch.int32, device=q.device)
    cu_q, cu_k, max_q, max_k, k_slice = rfa.llama3_flash_attn_prepare_cu_seqlens(
        cu, causal=True, rank=rank, world_size=world
    )
    return rfa.llama3_flash_attn_varlen_func(
        q, k, v, cu_q, cu_k, max_q, max_k, heads_k_stride=k.shape[1], local_k_slice=k_slice,
        softmax_scale=scale, causal=True, group=group,
    )
