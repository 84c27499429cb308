"""DAPO dynamic filtering and overlong penalty vs naive per-sample loops."""
import random

import pytest
import torch

from hpc_rlhf.algos.filtering import dynamic_filter_groups, overlong_penalty

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("n", [1, 2, 4])
@pytest.mark.parametrize("mean_range", [None, (0.0, 1.0)])
def test_dynamic_filter_matches_naive(n, mean_range):
    rng = random.Random(n)
    # Binary verifiable rewards make flat groups (all right / all wrong) common.
    rewards = torch.tensor([float(rng.random() < 0.5) for _ in range(16 * n)])
    rewards[:n] = 0.3  # flat, non-binary
    keep = dynamic_filter_groups(rewards, n, mean_range=mean_range)
    expected = []
    for g in range(0, len(rewards), n):
        grp = rewards[g : g + n].tolist()
        ok = max(grp) != min(grp)
        if mean_range is not None:
            ok = ok and mean_range[0] < sum(grp) / n < mean_range[1]
        expected += [ok] * n
    assert keep.dtype == torch.bool and keep.tolist() == expected
    if n > 1:
        assert 0 < keep.sum() < len(keep)
    else:
        assert not keep.any()  # a single sample has no group-relative signal


def test_dynamic_filter_mean_range_keeps_only_groups_inside():
    rewards = torch.tensor([0.0, 0.5, 0.9, 1.0, 0.2, 0.6])
    assert dynamic_filter_groups(rewards, 2, mean_range=(0.3, 0.9)).tolist() == [False] * 4 + [True] * 2
    with pytest.raises(ValueError, match="divide batch=6"):
        dynamic_filter_groups(rewards, 4)


@pytest.mark.parametrize("max_len,buffer_len,factor", [(100, 20, 1.0), (64, 64, 0.5), (10, 1, 2.0)])
def test_overlong_penalty_matches_naive(max_len, buffer_len, factor):
    lengths = torch.arange(0, max_len + 5)
    out = overlong_penalty(lengths, max_len, buffer_len, factor)
    expected = []
    for length in lengths.tolist():
        exceed = min(length - (max_len - buffer_len), buffer_len)
        expected.append(-exceed / buffer_len * factor if exceed > 0 else 0.0)
    torch.testing.assert_close(out, torch.tensor(expected), atol=1e-6, rtol=0)
    assert out[lengths <= max_len - buffer_len].eq(0).all()
    assert out[-1].item() == pytest.approx(-factor)


def test_overlong_penalty_rejects_bad_buffer():
    with pytest.raises(ValueError, match="buffer_len=0"):
        overlong_penalty(torch.tensor([5]), 10, 0, 1.0)
    with pytest.raises(ValueError, match="buffer_len=20"):
        overlong_penalty(torch.tensor([5]), 10, 20, 1.0)
