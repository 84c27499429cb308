"""The sender's staging ring: bucket-sized regions the trainer gathers weights straight into,
so that a bucket leaves from where its tensors were written (no packing copy).

    ring = StagingRing(bucket_bytes, regions=2, device)
    t = ring.alloc(shape, dtype)         # an aligned view in the current region
    t.copy_(gathered_param)              # the producer's one copy (it cloned before)
    loc = ring.claim(t)                  # the sender: (region, offset) if t is the oldest
                                         # unclaimed allocation, else None (then it packs t)

Regions are used in turn. Before a region is handed out again, `wait_region(r)` (set by the
sender) waits for the broadcasts still reading it. A region that holds an allocation nobody
claimed yet is never reused: the next allocation is a fresh tensor instead, so a producer that
holds several allocations before yielding them can never have them overwritten. A tensor
bigger than a region is a fresh tensor too (sent from its own memory).
"""
from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import torch

from hpc_rlhf.weight_sync.bucket import ALIGN, _aligned


@dataclass(frozen=True)
class Allocation:
    ptr: int        # data_ptr of the handed-out view
    nbytes: int
    region: int
    offset: int     # bytes from the region start (a multiple of ALIGN)


class StagingRing:
    def __init__(self, region_bytes: int, regions: int = 2, device="cpu"):
        if regions < 2 or region_bytes < ALIGN:
            raise ValueError(f"StagingRing needs >= 2 regions of >= {ALIGN} bytes "
                             f"(got {regions} x {region_bytes})")
        self.region_bytes, self.device = region_bytes, torch.device(device)
        self.buffers = [torch.empty(region_bytes, dtype=torch.uint8, device=self.device)
                        for _ in range(regions)]
        self.region, self.used = 0, 0
        self.pending: deque[Allocation] = deque()
        self.wait_region: Callable[[int], None] = lambda region: None
        self.fresh = 0  # allocations that did not fit the ring (statistics for tests/bench)

    def reset(self) -> None:
        """Start a sync: the next allocation opens a region afresh (its old reads are waited)."""
        self.pending.clear()
        self.used = self.region_bytes  # force a region switch on the first allocation

    def alloc(self, shape, dtype: torch.dtype) -> torch.Tensor:
        numel = 1
        for d in shape:
            numel *= int(d)
        nbytes = numel * torch.empty((), dtype=dtype).element_size()
        if nbytes == 0:
            return torch.empty(tuple(shape), dtype=dtype, device=self.device)
        if nbytes > self.region_bytes:
            self.fresh += 1
            return torch.empty(tuple(shape), dtype=dtype, device=self.device)
        start = _aligned(self.used)
        if start + nbytes > self.region_bytes:  # move on to the next region
            nxt = (self.region + 1) % len(self.buffers)
            if any(a.region == nxt for a in self.pending):  # still unclaimed: never overwrite
                self.fresh += 1
                return torch.empty(tuple(shape), dtype=dtype, device=self.device)
            self.wait_region(nxt)
            self.region, start = nxt, 0
        view = self.buffers[self.region][start:start + nbytes].view(dtype).view(tuple(shape))
        self.pending.append(Allocation(view.data_ptr(), nbytes, self.region, start))
        self.used = start + nbytes
        return view

    def claim(self, t: torch.Tensor) -> Allocation | None:
        """The allocation `t` is, if it is an unclaimed one; older unclaimed allocations are
        dropped (their producer gave them up). None for any other tensor."""
        ptr, nbytes = t.data_ptr(), t.numel() * t.element_size()
        if not nbytes or not t.is_contiguous() or t.device != self.device:
            return None
        for k, a in enumerate(self.pending):
            if a.ptr == ptr and a.nbytes == nbytes:
                for _ in range(k + 1):
                    self.pending.popleft()
                return a
        return None

    def region_view(self, region: int, end: int) -> torch.Tensor:
        return self.buffers[region][:end]
