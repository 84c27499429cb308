"""Move trainer weights into rollout engines: in-process (colocated) or bucketed broadcast.

The trainer side gives an iterator of (HF name, full tensor); for ZeRO-3 that iterator gathers
each parameter (e.g. inside `deepspeed.zero.GatheredParameters`) and yields it. Every tensor is
copied as soon as it is yielded, so the gather may be released right after.

Broadcast wire format, per bucket, over any `torch.distributed` ProcessGroup object (a
standalone `ProcessGroupGloo`/`ProcessGroupNCCL` spanning trainer and rollout ranks, or one
made by `new_group`): a fixed-size control message (wire.py: sizes, checksum, metas), then
the uint8 bucket buffer; an end control closes the sync. All asynchronous: the sender packs
bucket k+1 while bucket k is on the wire, the receiver's consumer loads bucket k while k+1
arrives, and nobody waits for a per-bucket handshake.
"""
from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch

from hpc_rlhf.weight_sync.bucket import Bucket, TensorMeta, bucketize, checksum, unbucketize
from hpc_rlhf.weight_sync.wire import (CONTROL_BYTES, decode_control, decode_metas,
                                       encode_control, end_control)

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


def _bcast(group, tensor: torch.Tensor, src: int):
    """Post a broadcast; returns its work (or None for an empty tensor: nothing to move)."""
    return group.broadcast(tensor, src) if tensor.numel() else None


def _wait(works) -> None:
    for work in works:
        if work is not None:
            work.wait()


class BroadcastSender:
    """Trainer side (group rank `src`): bucket and broadcast weights; reusable across syncs.

    device: where buckets live for the wire ("cpu" for gloo, the local CUDA device for NCCL).
    verify: send a checksum per bucket; receivers raise on a mismatch (debug; costs a pass).
    Holds two bucket buffers (2 * bucket_bytes) between syncs. Every message is posted
    asynchronously: bucket k+1 is packed into one buffer while bucket k leaves from the other,
    and its control message and payload queue up behind bucket k (no per-bucket round trip
    to the receivers). A contiguous tensor that alone fills a bucket is sent from its own
    memory (no copy); the sender then waits for it before pulling the next tensor, which the
    source (a ZeRO-3 gather) may free.
    """

    def __init__(self, group, src: int, *, bucket_bytes: int = DEFAULT_BUCKET_BYTES,
                 device="cpu", verify: bool = False):
        self.group, self.src, self.bucket_bytes = group, src, bucket_bytes
        self.device, self.verify = torch.device(device), verify
        self._buffers: list[torch.Tensor] = []

    def _post(self, bucket: Bucket) -> list:
        check = checksum(bucket.buffer) if self.verify else -1
        ctrl, overflow = encode_control(bucket.metas, bucket.nbytes, check, self.bucket_bytes)
        works = [_bcast(self.group, ctrl.to(self.device), self.src)]
        if overflow is not None:
            works.append(_bcast(self.group, overflow.to(self.device), self.src))
        works.append(_bcast(self.group, bucket.buffer, self.src))
        return works

    def send(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> SyncStats:
        if not self._buffers:
            self._buffers = [torch.empty(self.bucket_bytes, dtype=torch.uint8,
                                         device=self.device) for _ in range(2)]
        stats = SyncStats()
        start = time.perf_counter()
        in_flight: deque[list] = deque()  # posted works per bucket, oldest first
        try:
            for bucket in bucketize(named_tensors, self.bucket_bytes, device=self.device,
                                    buffers=self._buffers, borrow=True):
                in_flight.append(self._post(bucket))
                # the next bucket is packed into the buffer of the one before this one
                keep = 0 if bucket.borrowed else 1
                while len(in_flight) > keep:
                    _wait(in_flight.popleft())
                stats.buckets += 1
                stats.tensors += len(bucket.metas)
                stats.bytes += bucket.nbytes
            in_flight.append([_bcast(self.group, end_control().to(self.device), self.src)])
        finally:  # never return (or raise) with a buffer still being read by the wire
            while in_flight:
                _wait(in_flight.popleft())
        stats.seconds = time.perf_counter() - start
        return stats


class BroadcastReceiver:
    """Rollout side: receive a `BroadcastSender`'s buckets; reusable across syncs.

    Bucket k+1 is received while the consumer loads bucket k: its receive is posted before
    bucket k's tensors are yielded. Bucket buffers are pooled (at most `pool` kept): a buffer
    is reused only when no tensor viewing it is alive any more (vLLM's layer-wise reload holds
    views until a whole layer has arrived), otherwise a fresh one is allocated.
    """

    def __init__(self, group, src: int, *, device="cpu", pool: int = 3):
        self.group, self.src, self.device, self.pool = group, src, torch.device(device), pool
        self._pool: list[tuple[torch.Tensor, int]] = []  # (buffer, its idle storage use count)

    def _buffer(self, nbytes: int, capacity: int) -> torch.Tensor:
        for buf, idle in self._pool:
            if buf.numel() >= nbytes and _use_count(buf) == idle:
                return buf[:nbytes]
        if len(self._pool) < self.pool:  # pooled: sized so that every later bucket fits
            buf = torch.empty(max(nbytes, capacity), dtype=torch.uint8, device=self.device)
            idle = _use_count(buf)
            if idle is not None:
                self._pool.append((buf, idle))
            return buf[:nbytes]
        return torch.empty(nbytes, dtype=torch.uint8, device=self.device)

    def _post_bucket(self, ctrl: torch.Tensor):
        """Read a received control message and post its payload's receive.
        Returns None at the end of the sync, else (Bucket, checksum, work)."""
        nbytes, check, meta_len, overflow_len, capacity = decode_control(ctrl)
        if meta_len == 0:
            return None
        overflow = None
        if overflow_len:
            overflow = torch.empty(overflow_len, dtype=torch.uint8, device=self.device)
            _wait([_bcast(self.group, overflow, self.src)])
        metas: tuple[TensorMeta, ...] = decode_metas(ctrl, meta_len, overflow)
        buffer = self._buffer(nbytes, capacity)
        return Bucket(buffer, metas), check, _bcast(self.group, buffer, self.src)

    def receive(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield (name, tensor) bucket by bucket until the sender's end marker. Lazy: nothing
        is received until iterated, so pass it straight to `engine.load_weights`."""
        ctrl = torch.empty(CONTROL_BYTES, dtype=torch.uint8, device=self.device)
        _wait([_bcast(self.group, ctrl, self.src)])
        current = self._post_bucket(ctrl)
        index = 0
        while current is not None:
            ctrl_work = _bcast(self.group, ctrl, self.src)  # bucket k+1's control
            bucket, check, work = current
            _wait([work])
            if check != -1 and checksum(bucket.buffer) != check:
                names = [m.name for m in bucket.metas]
                raise RuntimeError(f"weight sync bucket {index} ({len(names)} tensors, first "
                                   f"{names[:3]}) failed its checksum: the transfer corrupted "
                                   "data")
            following = None
            if ctrl_work.is_completed():  # usual case: post k+1's receive before k is loaded
                ctrl_work.wait()
                following, ctrl_work = self._post_bucket(ctrl), None
            current = None  # our reference would keep the pool from reusing the buffer
            yield from unbucketize(bucket)
            del bucket
            if ctrl_work is not None:  # the sender was still packing (or gathering) k+1
                ctrl_work.wait()
                following = self._post_bucket(ctrl)
            current, index = following, index + 1

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
