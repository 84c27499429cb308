"""Weight-sync pieces without communication: the sender's staging ring (staging.py), bucket
views, checksum, single-threaded copy, and the broadcast's control message (wire.py). The
sender/receiver protocol itself runs over real gloo in
tests/distributed/test_weight_sync_broadcast.py."""
import pytest
import torch

from hpc_rlhf.weight_sync.bucket import (ALIGN, Bucket, TensorMeta, checksum, copy_bytes,
                                         unbucketize)
from hpc_rlhf.weight_sync.staging import StagingRing
from hpc_rlhf.weight_sync.wire import (CONTROL_BYTES, decode_control, decode_metas,
                                       encode_control, end_control)

pytestmark = pytest.mark.unit


def _tensors():
    g = torch.Generator().manual_seed(0)
    return [
        ("a.weight", torch.randn(7, 5, generator=g)),                            # float32
        ("b.bias", torch.randn(3, generator=g).to(torch.bfloat16)),
        ("c.half", torch.randn(2, 3, 4, generator=g).to(torch.float16)),
        ("d.ids", torch.randint(-5, 5, (9,), generator=g)),                     # int64
        ("e.scalar", torch.tensor(3.5, dtype=torch.float64)),
        ("f.empty", torch.zeros(0, 4)),
        ("g.big", torch.randn(100, generator=g)),                               # > bucket
        ("h.t", torch.randn(4, 6, generator=g).t()),                            # non-contiguous
    ]


def test_ring_allocations_are_aligned_views_and_buckets_round_trip():
    ring = StagingRing(1024, regions=2)
    ring.reset()
    metas, region = [], None
    for name, t in _tensors():
        if t.numel() * t.element_size() in range(1, 1025) and t.is_contiguous():
            dst = ring.alloc(tuple(t.shape), t.dtype)
            dst.copy_(t)
            at = ring.claim(dst)
            assert at is not None and at.offset % ALIGN == 0 and dst.data_ptr() % ALIGN == 0
            assert region in (None, at.region), "these fit one region"
            region = at.region
            metas.append(TensorMeta(name, tuple(t.shape), t.dtype, at.offset))
    end = metas[-1].offset + metas[-1].nbytes
    got = unbucketize(Bucket(ring.region_view(region, end), tuple(metas)))
    want = {n: t for n, t in _tensors()}
    assert [n for n, _ in got] == [m.name for m in metas] and len(got) == 6
    for name, t in got:
        assert t.dtype == want[name].dtype and torch.equal(t, want[name]), name


def test_ring_switches_regions_waiting_for_the_one_it_reuses():
    ring, waited = StagingRing(256, regions=3), []
    ring.wait_region = waited.append
    ring.reset()
    for _ in range(8):                       # 200 B each: one per region
        ring.claim(ring.alloc((50,), torch.float32))
    assert waited == [1, 2, 0, 1, 2, 0, 1, 2]
    assert ring.fresh == 0


def test_ring_never_overwrites_an_unclaimed_allocation():
    ring = StagingRing(256, regions=2)
    ring.reset()
    held = [ring.alloc((50,), torch.float32) for _ in range(2)]   # both regions, unclaimed
    for k, t in enumerate(held):
        t.fill_(k)
    extra = ring.alloc((50,), torch.float32)                       # would reuse held[0]'s
    assert ring.fresh == 1 and all(extra.data_ptr() != t.data_ptr() for t in held)
    extra.fill_(9)
    assert [float(t[0]) for t in held] == [0.0, 1.0]
    assert ring.claim(held[1]) is not None     # claiming the newer drops the older as given up
    assert ring.claim(held[0]) is None and ring.claim(extra) is None


def test_ring_oversize_and_empty_get_fresh_tensors_and_other_tensors_are_not_claimed():
    ring = StagingRing(256, regions=2)
    ring.reset()
    big = ring.alloc((100,), torch.float32)                # 400 B > region
    assert ring.fresh == 1 and ring.claim(big) is None
    assert ring.alloc((0, 4), torch.float32).numel() == 0 and ring.fresh == 1
    t = ring.alloc((8,), torch.float32)
    assert ring.claim(t.clone()) is None                   # same values, other memory
    assert ring.claim(t[::2]) is None                      # a view, not the allocation
    assert ring.claim(t) is not None and ring.claim(t) is None   # claimed once


def test_ring_refuses_bad_sizes():
    with pytest.raises(ValueError, match="2 regions"):
        StagingRing(256, regions=1)
    with pytest.raises(ValueError, match="64 bytes"):
        StagingRing(8)


def test_checksum_detects_corruption_and_swaps():
    buf = torch.randint(0, 256, (1000,), dtype=torch.uint8)
    ref = checksum(buf)
    assert checksum(buf.clone()) == ref
    assert checksum(buf, chunk=97) == ref          # chunking does not change the value
    flipped = buf.clone()
    flipped[500] ^= 1
    assert checksum(flipped) != ref
    swapped = buf.clone()
    swapped[[10, 11]] = buf[[11, 10]]
    if buf[10] != buf[11]:
        assert checksum(swapped) != ref


def test_copy_bytes_matches_copy():
    src = torch.randint(0, 256, (1 << 20,), dtype=torch.uint8)
    dst = torch.zeros_like(src)
    copy_bytes(dst[5:], src[:-5])
    assert torch.equal(dst[5:], src[:-5]) and int(dst[:5].sum()) == 0


@pytest.mark.parametrize("count", [1, 40, 2000])  # 2000 metas overflow the control message
def test_control_round_trip(count):
    metas = tuple(TensorMeta(f"model.layers.{i}.w", (i, 3), torch.bfloat16, 64 * i)
                  for i in range(count))
    ctrl, overflow = encode_control(metas, 12345, 678, 1 << 20)
    assert ctrl.numel() == CONTROL_BYTES and ctrl.dtype == torch.uint8
    nbytes, check, meta_len, overflow_len, capacity = decode_control(ctrl)
    assert (nbytes, check, capacity) == (12345, 678, 1 << 20)
    assert (overflow is None) == (overflow_len == 0) == (count < 2000)
    if overflow is not None:
        assert overflow.numel() == overflow_len
    assert decode_metas(ctrl, meta_len, overflow) == metas
    assert decode_control(end_control())[2] == 0


def test_control_from_another_protocol_is_refused():
    with pytest.raises(RuntimeError, match="out of step"):
        decode_control(torch.zeros(CONTROL_BYTES, dtype=torch.uint8))
