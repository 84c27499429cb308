"""RingLayout index arithmetic and the single-process data helpers."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hpc_rlhf.ring_attn import RingLayout, gather_from_ring, shard_batch_for_ring

pytestmark = pytest.mark.unit


def test_contiguous_layout_gives_each_rank_its_slice():
    layout = RingLayout((0, 3, 10), world=2)  # 10 tokens, no padding
    assert layout.local_len == 5
    assert layout.token_index(0).tolist() == [0, 1, 2, 3, 4]
    assert layout.token_index(1).tolist() == [5, 6, 7, 8, 9]
    assert layout.segment_ids(0).tolist() == [0, 0, 0, 1, 1]
    assert layout.position_ids(1).tolist() == [2, 3, 4, 5, 6]  # sample 1 started at token 3


def test_balanced_layout_is_zigzag_and_pads_to_2w_chunks():
    layout = RingLayout((0, 7), world=2, balanced=True)  # 7 tokens -> padded to 8, chunks of 2
    assert layout.padded_len == 8
    assert layout.token_index(0).tolist() == [0, 1, 6, 7]  # chunks 0 and 3
    assert layout.token_index(1).tolist() == [2, 3, 4, 5]  # chunks 1 and 2
    # the padding token (7) is its own sample, numbered after the real ones
    assert layout.segment_ids(0).tolist() == [0, 0, 0, 1]
    assert layout.position_ids(0).tolist() == [0, 1, 6, 0]


@settings(max_examples=40, deadline=None)
@given(
    lengths=st.lists(st.integers(1, 9), min_size=1, max_size=6),
    world=st.integers(1, 4),
    balanced=st.booleans(),
)
def test_shards_partition_the_row_and_unshard_inverts(lengths, world, balanced):
    cu = [0]
    for n in lengths:
        cu.append(cu[-1] + n)
    layout = RingLayout(tuple(cu), world, balanced)
    indices = torch.cat([layout.token_index(r) for r in range(world)])
    assert sorted(indices.tolist()) == list(range(layout.padded_len))
    x = torch.arange(cu[-1]) * 10 + 1
    parts = [layout.shard(x, r, pad_value=-1) for r in range(world)]
    assert all(p.numel() == layout.local_len for p in parts)
    assert torch.equal(layout.unshard(torch.cat(parts)), x)
    # positions restart at every sample boundary
    pos = layout.unshard(torch.cat([layout.position_ids(r) for r in range(world)]))
    want = torch.cat([torch.arange(n) for n in lengths])
    assert torch.equal(pos, want)


def test_shard_batch_for_single_process_ring_round_trips():
    ids = torch.arange(11)[None]
    shard = shard_batch_for_ring(ids, torch.tensor([0, 4, 11]), rank=0, world=1)
    assert shard.input_ids.tolist() == [list(range(11))]
    assert shard.position_ids.tolist() == [[0, 1, 2, 3, 0, 1, 2, 3, 4, 5, 6]]
    logp = torch.randn(1, 11, requires_grad=True)
    full = gather_from_ring(logp, shard.layout)
    assert torch.equal(full, logp)


@pytest.mark.parametrize(
    "cu, world, match",
    [((1, 4), 2, "must start at 0"), ((0, 4, 4), 2, "strictly increasing"), ((0, 4), 0, "world=0")],
)
def test_bad_layouts_are_refused_with_the_field_named(cu, world, match):
    with pytest.raises(ValueError, match=match):
        RingLayout(cu, world)


def test_batch_larger_than_one_row_is_refused():
    with pytest.raises(ValueError, match="pack the samples into one row"):
        shard_batch_for_ring(torch.zeros(2, 8, dtype=torch.long), [0, 8], 0, 2)


@pytest.mark.parametrize(
    "kwargs, match",
    [({"size": 0}, "ring_attn.size=0"), ({"layout": "zig"}, "ring_attn.layout='zig'"),
     ({"backend": "cuda"}, "ring_attn.backend='cuda'"), ({"q_chunk": 0}, "ring_attn.q_chunk=0")],
)
def test_ring_attn_config_refuses_bad_values(kwargs, match):
    from hpc_rlhf.ring_attn import RingAttnConfig

    with pytest.raises(ValueError, match=match):
        RingAttnConfig(**kwargs)
