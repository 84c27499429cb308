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
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch

from hpc_rlhf.topology.collectives import device_of
from hpc_rlhf.weight_sync.bucket import (ALIGN, Bucket, TensorMeta, _as_bytes, checksum,
                                         copy_bytes, unbucketize)
from hpc_rlhf.weight_sync.staging import StagingRing
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
    packed: int = 0   # tensors copied into a bucket (the others were produced in place)

    @property
    def bytes_per_s(self) -> float:
        return self.bytes / self.seconds if self.seconds > 0 else float("inf")

    def as_metrics(self, prefix: str = "weight_sync/") -> dict[str, float]:
        return {f"{prefix}bytes": float(self.bytes), f"{prefix}buckets": float(self.buckets),
                f"{prefix}seconds": self.seconds, f"{prefix}gb_per_s": self.bytes_per_s / 1e9,
                f"{prefix}packed_tensors": float(self.packed)}


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


def _wire_device(group, device) -> torch.device:
    """`device` if given, else where the group's backend needs tensors (CUDA for NCCL)."""
    return torch.device(device) if device is not None else device_of(group)


def _bcast(group, tensor: torch.Tensor, src: int):
    """Post a broadcast; returns its work (or None for an empty tensor: nothing to move)."""
    return group.broadcast(tensor, src) if tensor.numel() else None


def _wait(works) -> None:
    for work in works:
        if work is not None:
            work.wait()


class BroadcastSender:
    """Trainer side (group rank `src`): bucket and broadcast weights; reusable across syncs.

    device: where buckets live for the wire; None (default) takes the group's: the current
    CUDA device for NCCL, the CPU for gloo (hpc_rlhf.topology.collectives.device_of).
    verify: send a checksum per bucket; receivers raise on a mismatch (debug; costs a pass).

    Buckets are regions of a staging ring (staging.py: `regions` x bucket_bytes, kept between
    syncs). A producer that writes each weight into `sender.alloc(shape, dtype)` (the trainer's
    gather does: DeepSpeedStrategy.gathered_state(alloc=...)) has put it where its bucket
    leaves from: no packing copy. Any other tensor is copied into the ring (packed). Every
    message is posted asynchronously: while the producer fills region k+1, region k's control
    message and payload are on the wire; a region is reused only after its broadcasts finish.
    A tensor bigger than a bucket is sent from its own memory, and the sender waits for it
    before pulling the next tensor, which its source (a ZeRO-3 gather) may free.
    """

    def __init__(self, group, src: int, *, bucket_bytes: int = DEFAULT_BUCKET_BYTES,
                 device=None, verify: bool = False, regions: int = 2):
        self.group, self.src, self.bucket_bytes = group, src, bucket_bytes
        self.device, self.verify, self.regions = _wire_device(group, device), verify, regions
        self._ring: StagingRing | None = None
        self._reset_bucket()
        self._works: dict[int, list] = {}   # region -> posted works still reading it
        self._stats = SyncStats()

    # ---- staging ---------------------------------------------------------------------------
    def _staging(self) -> StagingRing:
        if self._ring is None:
            if self.bucket_bytes < ALIGN:
                raise ValueError(f"bucket_bytes={self.bucket_bytes} must be >= {ALIGN}; use "
                                 "e.g. 256 MB (rollout.weight_sync_bucket_mb=256)")
            self._ring = StagingRing(self.bucket_bytes, self.regions, self.device)
            self._ring.wait_region = self._free_region
            self._ring.reset()
        return self._ring

    def alloc(self, shape, dtype: torch.dtype) -> torch.Tensor:
        """An uninitialised tensor in the staging ring: write a weight into it and yield it to
        `send` to skip the packing copy. Valid until `send` has moved past it."""
        return self._staging().alloc(shape, dtype)

    def _free_region(self, region: int) -> None:
        """The ring is about to hand out `region` again: post its bucket if still open, then
        wait for every broadcast reading it."""
        if region == self._region and self._metas:
            self._post_open()
        _wait(self._works.pop(region, []))

    # ---- buckets ---------------------------------------------------------------------------
    def _reset_bucket(self) -> None:
        self._region: int | None = None
        self._metas: list[TensorMeta] = []
        self._end = 0

    def _post(self, bucket: Bucket) -> list:
        check = checksum(bucket.buffer) if self.verify else -1
        ctrl, overflow = encode_control(bucket.metas, bucket.nbytes, check, self.bucket_bytes)
        works = [_bcast(self.group, ctrl.to(self.device), self.src)]
        if overflow is not None:
            works.append(_bcast(self.group, overflow.to(self.device), self.src))
        works.append(_bcast(self.group, bucket.buffer, self.src))
        self._stats.buckets += 1
        self._stats.tensors += len(bucket.metas)
        self._stats.bytes += sum(m.nbytes for m in bucket.metas)
        return works

    def _post_open(self) -> None:
        """Post the open region's bucket (its claimed tensors, in order)."""
        region = self._region
        bucket = Bucket(self._staging().region_view(region, self._end), tuple(self._metas))
        self._works.setdefault(region, []).extend(self._post(bucket))
        self._reset_bucket()

    def _add(self, name: str, t: torch.Tensor, at) -> None:
        if self._region is not None and at.region != self._region:
            self._post_open()
        self._region = at.region
        self._metas.append(TensorMeta(name, tuple(t.shape), t.dtype, at.offset))
        self._end = at.offset + at.nbytes

    def _send_alone(self, name: str, t: torch.Tensor) -> None:
        """A tensor that does not go in the ring: its own bucket, from its own memory; waited
        for before the next pull (its source may free or reuse it)."""
        if self._metas:
            self._post_open()
        raw = _as_bytes(t)
        if raw.device != self.device:
            raw = raw.to(self.device)
        _wait(self._post(Bucket(raw, (TensorMeta(name, tuple(t.shape), t.dtype, 0),))))

    def send(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> SyncStats:
        ring = self._staging()
        self._stats, start = SyncStats(), time.perf_counter()
        try:
            for name, t in named_tensors:
                nbytes = t.numel() * t.element_size()
                at = ring.claim(t)
                if at is None and 0 < nbytes <= self.bucket_bytes:  # pack it into the ring
                    dst = ring.alloc(tuple(t.shape), t.dtype)
                    copy_bytes(_as_bytes(dst), _as_bytes(t))
                    at = ring.claim(dst)
                    self._stats.packed += at is not None
                if at is None:
                    self._send_alone(name, t)
                else:
                    self._add(name, t, at)
            if self._metas:
                self._post_open()
            self._works.setdefault(-1, []).append(
                _bcast(self.group, end_control().to(self.device), self.src))
        finally:  # never return (or raise) with a region still being read by the wire
            for works in self._works.values():
                _wait(works)
            self._works.clear()
            self._reset_bucket()
            ring.reset()
        stats, stats.seconds = self._stats, time.perf_counter() - start
        return stats


class BroadcastReceiver:
    """Rollout side: receive a `BroadcastSender`'s buckets; reusable across syncs.

    Bucket k+1 is received while the consumer loads bucket k: its receive is posted before
    bucket k's tensors are yielded. Bucket buffers are pooled (at most `pool` kept): a buffer
    is reused only when no tensor viewing it is alive any more (vLLM's layer-wise reload holds
    views until a whole layer has arrived), otherwise a fresh one is allocated.
    """

    def __init__(self, group, src: int, *, device=None, pool: int = 3):
        self.group, self.src, self.pool = group, src, pool
        self.device = _wire_device(group, device)
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
                      bucket_bytes: int = DEFAULT_BUCKET_BYTES, device=None,
                      verify: bool = False) -> SyncStats:
    """One-shot `BroadcastSender(...).send(named_tensors)`."""
    return BroadcastSender(group, src, bucket_bytes=bucket_bytes, device=device,
                           verify=verify).send(named_tensors)


def receive_weights(group, src: int, *, device=None) -> Iterator[tuple[str, torch.Tensor]]:
    """One-shot `BroadcastReceiver(...).receive()`."""
    return BroadcastReceiver(group, src, device=device).receive()


def sync_from_broadcast(engine, group, src: int, *, device=None) -> None:
    """One-shot `BroadcastReceiver(...).load_into(engine)`."""
    BroadcastReceiver(group, src, device=device).load_into(engine)
