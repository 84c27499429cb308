"""Pack named tensors into byte buckets and back: pure functions, no communication.

A bucket is one flat uint8 buffer plus the metadata to cut it back into tensors. Tensors of
any dtype share a bucket (each starts at an offset aligned to `ALIGN` bytes so the slice can be
viewed as its dtype), so a sync broadcasts ceil(total / bucket_bytes) buffers and no more.

`bucketize` copies each tensor into the bucket as soon as it arrives: the caller may free or
re-shard a tensor right after yielding it (a ZeRO-3 gather context that exits, say).
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import torch

ALIGN = 64  # bytes; a multiple of every dtype's element size


@dataclass(frozen=True)
class TensorMeta:
    """Where one tensor lives inside its bucket."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    offset: int  # bytes from the bucket start, a multiple of ALIGN

    @property
    def nbytes(self) -> int:
        numel = 1
        for d in self.shape:
            numel *= d
        return numel * _itemsize(self.dtype)


@dataclass
class Bucket:
    buffer: torch.Tensor          # [nbytes] uint8, contiguous
    metas: tuple[TensorMeta, ...]

    @property
    def nbytes(self) -> int:
        return self.buffer.numel()


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _aligned(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def _as_bytes(t: torch.Tensor) -> torch.Tensor:
    """[nbytes] uint8 view of a tensor's data (made contiguous first)."""
    t = t.detach().contiguous()
    if t.dim() == 0:
        t = t.reshape(1)
    return t.view(-1).view(torch.uint8)


def bucketize(named_tensors: Iterable[tuple[str, torch.Tensor]], bucket_bytes: int, *,
              device: torch.device | str | None = None,
              buffers: Sequence[torch.Tensor] = ()) -> Iterator[Bucket]:
    """Group tensors, in order, into buckets of at most `bucket_bytes` (a bigger tensor gets a
    bucket of its own). The buffer lives on `device` (default: the first tensor's device).

    buffers: uint8 buffers of >= bucket_bytes to pack into, in turn (bucket k uses
    buffers[k % len]), instead of a fresh allocation per bucket (on CPU a fresh one costs page
    faults comparable to the copy). The caller must be done with bucket k before asking for
    bucket k + len(buffers). An oversize bucket always gets its own allocation.
    """
    if any(b.dtype != torch.uint8 or b.numel() < bucket_bytes for b in buffers):
        raise ValueError(f"buffers must be uint8 with >= bucket_bytes={bucket_bytes} elements")
    count = 0
    if bucket_bytes < ALIGN:
        raise ValueError(f"bucket_bytes={bucket_bytes} must be >= {ALIGN}; use e.g. 256 MB "
                         "(rollout.weight_sync_bucket_mb=256)")
    metas: list[TensorMeta] = []
    buffer = None
    used = 0
    for name, t in named_tensors:
        nbytes = t.numel() * t.element_size()
        if metas and _aligned(used) + nbytes > bucket_bytes:
            yield Bucket(buffer[:used], tuple(metas))
            metas, buffer, used, count = [], None, 0, count + 1
        if buffer is None:
            dev = torch.device(device) if device is not None else t.device
            if buffers and nbytes <= bucket_bytes:
                buffer = buffers[count % len(buffers)]
            else:
                buffer = torch.empty(max(bucket_bytes, nbytes), dtype=torch.uint8, device=dev)
        start = _aligned(used)
        buffer[start:start + nbytes].copy_(_as_bytes(t))
        metas.append(TensorMeta(name, tuple(t.shape), t.dtype, start))
        used = start + nbytes
    if metas:
        yield Bucket(buffer[:used], tuple(metas))


def unbucketize(bucket: Bucket) -> list[tuple[str, torch.Tensor]]:
    """The bucket's tensors, as views into its buffer (no copy)."""
    out = []
    for m in bucket.metas:
        raw = bucket.buffer[m.offset:m.offset + m.nbytes]
        out.append((m.name, raw.view(m.dtype).view(m.shape)))
    return out


def checksum(buffer: torch.Tensor, chunk: int = 1 << 24) -> int:
    """Position-weighted byte sum of a uint8 buffer: catches flipped, dropped or swapped bytes.

    Works on `chunk`-byte slices so the int64 temporaries stay small (8 * chunk bytes).
    """
    total = 0
    for start in range(0, buffer.numel(), chunk):
        b = buffer[start:start + chunk].to(torch.int64)                      # [c]
        weights = torch.arange(start, start + b.numel(), device=b.device) % 65521 + 1
        total += int((b * weights).sum().item())
    return total
