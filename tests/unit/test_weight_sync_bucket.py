"""Bucketing: round trip with mixed dtypes, size bound, copy-on-arrival, checksum."""
import pytest
import torch

from hpc_rlhf.weight_sync.bucket import ALIGN, bucketize, checksum, unbucketize

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
