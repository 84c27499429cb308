"""Bucketing: round trip with mixed dtypes, size bound, copy-on-arrival, borrowed buckets,
checksum; the broadcast's control message (wire.py)."""
import pytest
import torch

from hpc_rlhf.weight_sync.bucket import (ALIGN, TensorMeta, bucketize, checksum, copy_bytes,
                                         unbucketize)
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


@pytest.mark.parametrize("bucket_bytes", [64, 128, 256, 10_000])
def test_round_trip_mixed_dtypes(bucket_bytes):
    tensors = _tensors()
    buckets = list(bucketize(iter(tensors), bucket_bytes))
    out = [nt for b in buckets for nt in unbucketize(b)]
    assert [n for n, _ in out] == [n for n, _ in tensors]
    for (name, want), (_, got) in zip(tensors, out):
        assert got.dtype == want.dtype and got.shape == want.shape, name
        assert torch.equal(got, want), name
    for b in buckets:
        # at most bucket_bytes unless the bucket holds one tensor that alone is bigger
        assert b.nbytes <= bucket_bytes or len(b.metas) == 1
        assert all(m.offset % ALIGN == 0 for m in b.metas)
        assert b.buffer.dtype == torch.uint8 and b.buffer.is_contiguous()
    if bucket_bytes == 10_000:
        assert len(buckets) == 1


def test_bucket_count_is_minimal_for_equal_tensors():
    # 10 tensors of 256 bytes, buckets of 1024 bytes -> exactly 4 per bucket -> 3 buckets
    tensors = [(f"p{i}", torch.full((64,), float(i))) for i in range(10)]
    buckets = list(bucketize(tensors, 1024))
    assert [len(b.metas) for b in buckets] == [4, 4, 2]


def test_tensor_copied_on_arrival():
    # A ZeRO-3 gather frees the full tensor right after yielding it: the bucket must own a copy.
    def gathered():
        t = torch.ones(8)
        yield "w", t
        t.zero_()                     # "released" before the bucket is flushed
        yield "v", torch.full((8,), 2.0)

    (bucket,) = list(bucketize(gathered(), 4096))
    w = dict(unbucketize(bucket))["w"]
    assert torch.equal(w, torch.ones(8))


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


def test_bad_bucket_size_is_refused():
    with pytest.raises(ValueError, match="bucket_bytes"):
        list(bucketize([("x", torch.ones(1))], 8))


@pytest.mark.parametrize("bucket_bytes", [256, 400, 4096])
def test_borrowed_buckets_view_big_tensors_without_copy(bucket_bytes):
    # "big" (400 bytes) fills a 256/400-byte bucket: it is sent from its own memory; packing
    # the others must not change; a non-contiguous big tensor is still copied.
    tensors = [("small", torch.arange(10.0)), ("big", torch.arange(100.0)),
               ("tail", torch.arange(3.0)), ("big_t", torch.arange(200.0).view(10, 20).t())]
    buckets = list(bucketize(iter(tensors), bucket_bytes, borrow=True))
    out = [nt for b in buckets for nt in unbucketize(b)]
    assert [n for n, _ in out] == [n for n, _ in tensors]
    for (name, want), (_, got) in zip(tensors, out):
        assert torch.equal(got, want), name
    borrowed = [b.metas[0].name for b in buckets if b.borrowed]
    assert borrowed == (["big"] if bucket_bytes <= 400 else [])
    for b in buckets:
        if b.borrowed:  # a view of the caller's tensor, not a copy
            assert b.buffer.data_ptr() == tensors[1][1].data_ptr() and len(b.metas) == 1


def test_borrowed_bucket_is_yielded_before_the_next_tensor_is_pulled():
    # ZeRO-3 frees a gathered tensor once its generator resumes: a borrowed bucket must be
    # handed out while the source still holds it.
    pulled = []

    def source():
        for name in ("a", "big", "b"):
            pulled.append(name)
            yield name, torch.ones(64 if name == "big" else 4)

    for bucket in bucketize(source(), 256, borrow=True):
        if bucket.borrowed:
            assert pulled == ["a", "big"]


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
