"""Move trainer weights into rollout engines: in-process (colocated) or bucketed broadcast.

The trainer side gives an iterator of (HF name, full tensor); for ZeRO-3 that iterator gathers
each parameter (e.g. inside `deepspeed.zero.GatheredParameters`) and yields it. Every tensor is
copied as soon as it is yielded, so the gather may be released right after.

Broadcast wire format, per bucket, over any `torch.distributed` ProcessGroup object (a
standalone `ProcessGroupGloo`/`ProcessGroupNCCL` spanning trainer and rollout ranks, or one
made by `new_group`): header int64[3] = (meta bytes, buffer bytes, checksum or -1), then the
pickled `TensorMeta` list as uint8, then the uint8 buffer. A header of zeros ends the sync.
The sender packs bucket k+1 while bucket k is on the wire.
"""
from __future__ import annotations

import pickle
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch

from hpc_rlhf.weight_sync.bucket import Bucket, TensorMeta, bucketize, checksum, unbucketize

DEFAULT_BUCKET_BYTES = 256 * 2**20


@dataclass
class SyncStats:
    """What one sync moved (sender view) and how fast."""

    tensors: int = 0
    buckets: int = 0
    bytes: int = 0
    seconds: float = 0.0

    @property
    def bytes_per_s(self) -> float:
        return self.bytes / self.seconds if self.seconds > 0 else float("inf")

    def as_metrics(self, prefix: str = "weight_sync/") -> dict[str, float]:
        return {f"{prefix}bytes": float(self.bytes), f"{prefix}buckets": float(self.buckets),
                f"{prefix}seconds": self.seconds, f"{prefix}gb_per_s": self.bytes_per_s / 1e9}


def copied(named_tensors: Iterable[tuple[str, torch.Tensor]]
           ) -> Iterator[tuple[str, torch.Tensor]]:
    """Clone each tensor as it arrives (vLLM's layer-wise reload keeps references until a whole
    layer has arrived; a ZeRO-3 gathered tensor is released before that)."""
    for name, t in named_tensors:
        yield name, t.detach().clone()


def sync_in_process(engine, named_tensors: Iterable[tuple[str, torch.Tensor]], *,
                    copy: bool = True) -> SyncStats:
    """Colocated mode: hand the trainer's tensors straight to `engine.load_weights`."""
    stats = SyncStats()
    start = time.perf_counter()

    def counted(it):
        for name, t in it:
            stats.tensors += 1
            stats.bytes += t.numel() * t.element_size()
            yield name, t

    engine.load_weights(counted(copied(named_tensors) if copy else named_tensors))
    stats.seconds = time.perf_counter() - start
    return stats


def _bcast(group, tensor: torch.Tensor, src: int, async_op: bool = False):
    work = group.broadcast(tensor, src)
    if async_op:
        return work
    work.wait()
    return None


class BroadcastSender:
    """Trainer side (group rank `src`): bucket and broadcast weights; reusable across syncs.

    device: where buckets live for the wire ("cpu" for gloo, the local CUDA device for NCCL).
    verify: send a checksum per bucket; receivers raise on a mismatch (debug; costs a pass).
    Holds two bucket buffers (2 * bucket_bytes) between syncs: bucket k+1 is packed into one
    while bucket k is on the wire from the other.
    """

    def __init__(self, group, src: int, *, bucket_bytes: int = DEFAULT_BUCKET_BYTES,
                 device="cpu", verify: bool = False):
        self.group, self.src, self.bucket_bytes = group, src, bucket_bytes
        self.device, self.verify = torch.device(device), verify
        self._buffers: list[torch.Tensor] = []

    def send(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> SyncStats:
        if not self._buffers:
            self._buffers = [torch.empty(self.bucket_bytes, dtype=torch.uint8,
                                         device=self.device) for _ in range(2)]
        group, src, device = self.group, self.src, self.device
        stats = SyncStats()
        start = time.perf_counter()
        pending = None  # (work, bucket): the buffer stays untouched until its broadcast is done
        for bucket in bucketize(named_tensors, self.bucket_bytes, device=device,
                                buffers=self._buffers):
            if pending is not None:
                pending[0].wait()
            meta = torch.frombuffer(bytearray(pickle.dumps(bucket.metas)), dtype=torch.uint8)
            check = checksum(bucket.buffer) if self.verify else -1
            header = torch.tensor([meta.numel(), bucket.nbytes, check], dtype=torch.int64)
            _bcast(group, header.to(device), src)
            _bcast(group, meta.to(device), src)
            pending = (_bcast(group, bucket.buffer, src, async_op=True), bucket)
            stats.buckets += 1
            stats.tensors += len(bucket.metas)
            stats.bytes += bucket.nbytes
        if pending is not None:
            pending[0].wait()
        _bcast(group, torch.zeros(3, dtype=torch.int64, device=device), src)
        stats.seconds = time.perf_counter() - start
        return stats


class BroadcastReceiver:
    """Rollout side: receive a `BroadcastSender`'s buckets; reusable across syncs.

    Bucket buffers are pooled (at most `pool` kept): a buffer is reused only when no tensor
    viewing it is alive any more (vLLM's layer-wise reload holds views until a whole layer has
    arrived), otherwise a fresh one is allocated.
    """

    def __init__(self, group, src: int, *, device="cpu", pool: int = 3):
        self.group, self.src, self.device, self.pool = group, src, torch.device(device), pool
        self._pool: list[tuple[torch.Tensor, int]] = []  # (buffer, its idle storage use count)

    def _buffer(self, nbytes: int) -> torch.Tensor:
        for buf, idle in self._pool:
            if buf.numel() >= nbytes and _use_count(buf) == idle:
                return buf[:nbytes]
        buf = torch.empty(nbytes, dtype=torch.uint8, device=self.device)
        idle = _use_count(buf)
        if idle is not None and len(self._pool) < self.pool:
            self._pool.append((buf, idle))
        return buf

    def receive(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield (name, tensor) bucket by bucket until the sender's end marker. Lazy: nothing
        is received until iterated, so pass it straight to `engine.load_weights`."""
        group, src, device = self.group, self.src, self.device
        index = 0
        while True:
            header = torch.empty(3, dtype=torch.int64, device=device)
            _bcast(group, header, src)
            meta_len, buf_len, check = (int(v) for v in header.tolist())
            if meta_len == 0:
                return
            meta = torch.empty(meta_len, dtype=torch.uint8, device=device)
            _bcast(group, meta, src)
            metas: tuple[TensorMeta, ...] = pickle.loads(meta.cpu().numpy().tobytes())
            buffer = self._buffer(buf_len)
            _bcast(group, buffer, src)
            if check != -1 and checksum(buffer) != check:
                names = [m.name for m in metas]
                raise RuntimeError(f"weight sync bucket {index} ({len(names)} tensors, first "
                                   f"{names[:3]}) failed its checksum: the transfer corrupted "
                                   "data")
            yield from unbucketize(Bucket(buffer, metas))
            index += 1

    def load_into(self, engine) -> None:
        """Stream one sync into `engine.load_weights`."""
        received = self.receive()
        engine.load_weights(received)
        leftover = sum(1 for _ in received)  # keep the wire in step even if the engine stopped
        if leftover:
            raise RuntimeError(f"engine.load_weights stopped with {leftover} received tensors "
                               "unread; those weights were not loaded")


def _use_count(buf: torch.Tensor) -> int | None:
    """How many tensors share buf's storage (private torch API; None where missing)."""
    fn = getattr(torch._C, "_storage_Use_Count", None)
    return None if fn is None else fn(buf.untyped_storage()._cdata)


def broadcast_weights(named_tensors: Iterable[tuple[str, torch.Tensor]], group, src: int, *,
                      bucket_bytes: int = DEFAULT_BUCKET_BYTES, device="cpu",
                      verify: bool = False) -> SyncStats:
    """One-shot `BroadcastSender(...).send(named_tensors)`."""
    return BroadcastSender(group, src, bucket_bytes=bucket_bytes, device=device,
                           verify=verify).send(named_tensors)


def receive_weights(group, src: int, *, device="cpu") -> Iterator[tuple[str, torch.Tensor]]:
    """One-shot `BroadcastReceiver(...).receive()`."""
    return BroadcastReceiver(group, src, device=device).receive()


def sync_from_broadcast(engine, group, src: int, *, device="cpu") -> None:
    """One-shot `BroadcastReceiver(...).load_into(engine)`."""
    BroadcastReceiver(group, src, device=device).load_into(engine)
