"""Advantage estimators vs naive per-sample python loops on random masked inputs.

Tolerances: atol 1e-5 for float32, 1e-10 for float64 (the references run in python floats).
"""
import math
import random

import pytest
import torch

from hpc_rlhf.algos.advantages import (
    ESTIMATORS,
    compute_advantages,
    discounted_returns,
    dr_grpo_advantages,
    gae_advantages,
    global_normalize,
    grpo_advantages,
    reinforce_baseline_advantages,
    rloo_advantages,
    token_rewards,
)

pytestmark = pytest.mark.unit

ATOL = {torch.float32: 1e-5, torch.float64: 1e-10}
DTYPES = [torch.float32, torch.float64]


def random_mask(batch, resp_len, rng):
    """Rows: full, trailing padding, an env-feedback hole mid-response, and one all-masked row."""
    rows = []
    for i in range(batch):
        kind = i % 4 if i != 1 else 3
        row = [0] * resp_len
        if kind == 0:
            row = [1] * resp_len
        elif kind == 1 or kind == 2:
            length = rng.randint(1, resp_len)
            row[:length] = [1] * length
            if kind == 2 and length >= 4:
                start = rng.randint(1, length - 2)
                stop = rng.randint(start + 1, length - 1)
                row[start:stop] = [0] * (stop - start)
        # kind 3: all masked (no response token)
        rows.append(row)
    return torch.tensor(rows, dtype=torch.long)


def action_positions(mask_row):
    return [t for t, m in enumerate(mask_row.tolist()) if m]


def naive_gae(rewards, values, mask, gamma, lam):
    batch, resp_len = rewards.shape
    adv = [[0.0] * resp_len for _ in range(batch)]
    ret = [[0.0] * resp_len for _ in range(batch)]
    for i in range(batch):
        pos = action_positions(mask[i])
        last, next_v = 0.0, 0.0
        for t in reversed(pos):
            r, v = rewards[i, t].item(), values[i, t].item()
            delta = r + gamma * next_v - v
            last = delta + gamma * lam * last
            adv[i][t] = last
            ret[i][t] = last + v
            next_v = v
    return torch.tensor(adv, dtype=torch.float64), torch.tensor(ret, dtype=torch.float64)


def naive_returns(rewards, mask, gamma):
    batch, resp_len = rewards.shape
    out = [[0.0] * resp_len for _ in range(batch)]
    for i in range(batch):
        running = 0.0
        for t in reversed(action_positions(mask[i])):
            running = rewards[i, t].item() + gamma * running
            out[i][t] = running
    return torch.tensor(out, dtype=torch.float64)


def naive_token_rewards(rewards, mask, kl, kl_coef):
    batch, resp_len = mask.shape
    out = [[0.0] * resp_len for _ in range(batch)]
    for i in range(batch):
        pos = action_positions(mask[i])
        for t in pos:
            out[i][t] = -kl_coef * (kl[i, t].item() if kl is not None else 0.0)
        if pos:
            out[i][pos[-1]] += rewards[i].item()
    return torch.tensor(out, dtype=torch.float64)


def naive_group(rewards, n, kind, eps=1e-6):
    vals = rewards.tolist()
    out = []
    for g in range(0, len(vals), n):
        grp = vals[g : g + n]
        mean = sum(grp) / n
        for j, r in enumerate(grp):
            if max(grp) == min(grp):
                out.append(0.0)
            elif kind == "grpo":
                std = math.sqrt(sum((x - mean) ** 2 for x in grp) / (n - 1))
                out.append((r - mean) / (std + eps))
            elif kind in ("dr_grpo", "reinforce_baseline"):
                out.append(r - mean)
            elif kind == "rloo":
                others = [x for k, x in enumerate(grp) if k != j]
                out.append(r - sum(others) / (n - 1))
            else:
                out.append(r)
    return torch.tensor(out, dtype=torch.float64)


def naive_global_normalize(adv, mask, std=True, eps=1e-8):
    sel = [adv[i, t].item() for i in range(adv.shape[0]) for t in action_positions(mask[i])]
    out = torch.zeros(adv.shape, dtype=torch.float64)
    if not sel:
        return out
    mean = sum(sel) / len(sel)
    var = sum((x - mean) ** 2 for x in sel) / len(sel)
    scale = 1.0 / math.sqrt(max(var, eps)) if std else 1.0
    for i in range(adv.shape[0]):
        for t in action_positions(mask[i]):
            out[i, t] = (adv[i, t].item() - mean) * scale
    return out


def close(actual, expected, dtype):
    assert not torch.isnan(actual).any()
    torch.testing.assert_close(actual.double(), expected.double(), atol=ATOL[dtype], rtol=0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_gae_matches_naive(dtype, seed):
    rng, gen = random.Random(seed), torch.Generator().manual_seed(seed)
    mask = random_mask(8, 13, rng)
    rewards = torch.randn(8, 13, generator=gen, dtype=dtype)
    values = torch.randn(8, 13, generator=gen, dtype=dtype)
    gamma, lam = rng.uniform(0.8, 1.0), rng.uniform(0.5, 1.0)
    adv, ret = gae_advantages(rewards, values, mask, gamma, lam)
    ref_adv, ref_ret = naive_gae(rewards, values, mask, gamma, lam)
    assert adv.dtype == dtype
    close(adv, ref_adv, dtype)
    close(ret, ref_ret, dtype)


def test_gae_equals_zero_padded_gae_without_holes():
    """With only trailing padding, skipping masked tokens equals the usual zero-padded GAE."""
    rng, gen = random.Random(5), torch.Generator().manual_seed(5)
    mask = torch.zeros(6, 10, dtype=torch.long)
    for i in range(6):
        mask[i, : rng.randint(1, 10)] = 1
    rewards = torch.randn(6, 10, generator=gen, dtype=torch.float64)
    values = torch.randn(6, 10, generator=gen, dtype=torch.float64)
    gamma, lam = 0.97, 0.9
    r, v = rewards * mask, values * mask
    last = torch.zeros(6, dtype=torch.float64)
    expected = torch.zeros(6, 10, dtype=torch.float64)
    for t in reversed(range(10)):
        next_v = v[:, t + 1] if t < 9 else 0.0
        last = r[:, t] + gamma * next_v - v[:, t] + gamma * lam * last
        expected[:, t] = last
    adv, _ = gae_advantages(rewards, values, mask, gamma, lam)
    close(adv, expected * mask, torch.float64)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("gamma", [0.93, 1.0])  # 1.0 takes the reverse-cumsum fast path
def test_discounted_returns_matches_naive_and_gae(dtype, gamma):
    rng, gen = random.Random(3), torch.Generator().manual_seed(3)
    mask = random_mask(8, 11, rng)
    rewards = torch.randn(8, 11, generator=gen, dtype=dtype)
    ret = discounted_returns(rewards, mask, gamma)
    close(ret, naive_returns(rewards, mask, gamma), dtype)
    gae_adv, _ = gae_advantages(rewards, torch.zeros_like(rewards), mask, gamma, 1.0)
    close(ret, gae_adv.double(), dtype)


def test_gae_ignores_garbage_at_masked_positions():
    mask = torch.tensor([[1, 1, 0, 0, 1, 0]])
    rewards = torch.tensor([[0.5, 0.0, float("nan"), 7.0, 1.0, float("inf")]])
    values = torch.tensor([[0.1, 0.2, float("nan"), -9.0, 0.3, float("inf")]])
    adv, ret = gae_advantages(rewards, values, mask, 1.0, 1.0)
    assert torch.isfinite(adv).all() and torch.isfinite(ret).all()
    # Last action token: 1.0 - 0.3; the next back skips the env tokens: 0 + 0.3 - 0.2 + 0.7.
    assert adv[0, 4].item() == pytest.approx(0.7)
    assert adv[0, 1].item() == pytest.approx(0.8)
    assert adv[0, 2].item() == 0.0 and adv[0, 3].item() == 0.0


@pytest.mark.parametrize("dtype", DTYPES)
def test_token_rewards_matches_naive(dtype):
    rng, gen = random.Random(4), torch.Generator().manual_seed(4)
    mask = random_mask(8, 9, rng)
    rewards = torch.randn(8, generator=gen, dtype=dtype)
    kl = torch.randn(8, 9, generator=gen, dtype=dtype)
    close(token_rewards(rewards, mask, kl, 0.05), naive_token_rewards(rewards, mask, kl, 0.05), dtype)
    close(token_rewards(rewards, mask), naive_token_rewards(rewards, mask, None, 0.0), dtype)


GROUP_FNS = {
    "grpo": grpo_advantages,
    "dr_grpo": dr_grpo_advantages,
    "reinforce_baseline": reinforce_baseline_advantages,
    "rloo": rloo_advantages,
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", sorted(GROUP_FNS))
@pytest.mark.parametrize("n", [2, 4])
def test_group_baselines_match_naive(dtype, kind, n):
    gen = torch.Generator().manual_seed(n)
    rewards = torch.randn(6 * n, generator=gen, dtype=dtype)
    rewards[:n] = 0.1  # one flat group
    rewards[n : 2 * n] = torch.tensor([0.0, 1.0] * (n // 2), dtype=dtype)  # binary rewards
    out = GROUP_FNS[kind](rewards, n)
    close(out, naive_group(rewards, n, kind), dtype)


@pytest.mark.parametrize("kind", sorted(GROUP_FNS))
def test_flat_group_gives_exact_zero(kind):
    # float32 mean of equal 0.1s is not exactly 0.1; std ~1e-9 would turn noise into +-1.
    rewards = torch.tensor([0.1] * 3 + [0.7, 0.7, 0.7] + [1.0, 0.0, 1.0], dtype=torch.float32)
    out = GROUP_FNS[kind](rewards, 3)
    assert torch.isfinite(out).all()
    assert torch.equal(out[:6], torch.zeros(6))
    assert out[6:].abs().sum() > 0


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("std", [True, False])
def test_global_normalize_matches_naive(dtype, std):
    rng, gen = random.Random(6), torch.Generator().manual_seed(6)
    mask = random_mask(8, 7, rng)
    adv = torch.randn(8, 7, generator=gen, dtype=dtype) * 3 + 1
    close(global_normalize(adv, mask, std=std), naive_global_normalize(adv, mask, std=std), dtype)


def test_global_normalize_all_masked_is_zero():
    out = global_normalize(torch.randn(3, 4), torch.zeros(3, 4))
    assert torch.equal(out, torch.zeros(3, 4))


def naive_pipeline(estimator, rewards, mask, n, values, kl, kl_coef, gamma, lam, reward_clip):
    r = rewards.clamp(*reward_clip) if reward_clip else rewards
    shaped = naive_group(r.double(), n, estimator) if estimator in GROUP_FNS else r.double()
    r_tok = naive_token_rewards(shaped, mask, kl.double(), kl_coef)
    if estimator == "gae":
        adv, ret = naive_gae(r_tok, values.double(), mask, gamma, lam)
    else:
        ret = naive_returns(r_tok, mask, gamma)
        adv = ret.clone()
    if estimator in ("gae", "reinforce", "reinforce_baseline"):
        adv = naive_global_normalize(adv, mask)
    return adv, ret


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_compute_advantages_matches_naive_pipeline(dtype, estimator):
    rng, gen = random.Random(7), torch.Generator().manual_seed(7)
    n, batch, resp_len = 4, 12, 9
    mask = random_mask(batch, resp_len, rng)
    rewards = torch.randn(batch, generator=gen, dtype=dtype)
    kl = torch.randn(batch, resp_len, generator=gen, dtype=dtype).abs() * 0.1
    values = torch.randn(batch, resp_len, generator=gen, dtype=dtype)
    group = estimator in GROUP_FNS
    gamma = 1.0 if group else 0.95
    lam = 0.9
    kwargs = dict(n_samples_per_prompt=n, kl=kl, kl_coef=0.02, gamma=gamma, lam=lam, reward_clip=(-1.0, 1.0))
    if estimator == "gae":
        kwargs["values"] = values
    adv, ret = compute_advantages(estimator, rewards, mask, **kwargs)
    ref_adv, ref_ret = naive_pipeline(estimator, rewards, mask, n, values, kl, 0.02, gamma, lam, (-1.0, 1.0))
    close(adv, ref_adv, dtype)
    close(ret, ref_ret, dtype)
    assert torch.equal(adv[mask == 0], torch.zeros_like(adv[mask == 0]))


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_compute_advantages_all_masked_rows_no_nan(estimator):
    mask = torch.zeros(4, 5, dtype=torch.long)
    mask[2, :3] = 1
    values = torch.randn(4, 5) if estimator == "gae" else None
    for m in (mask, torch.zeros_like(mask)):
        adv, ret = compute_advantages(
            estimator, torch.tensor([1.0, 0.0, 1.0, 1.0]), m, n_samples_per_prompt=2, values=values
        )
        assert torch.isfinite(adv).all() and torch.isfinite(ret).all()
        assert adv[m == 0].abs().sum() == 0 and ret[m == 0].abs().sum() == 0


def test_compute_advantages_rejects_bad_input():
    mask = torch.ones(4, 3)
    rewards = torch.zeros(4)
    with pytest.raises(ValueError, match="gae, reinforce, reinforce_baseline, grpo, dr_grpo, rloo"):
        compute_advantages("ppo", rewards, mask)
    with pytest.raises(ValueError, match="values"):
        compute_advantages("gae", rewards, mask)
    with pytest.raises(ValueError, match="critic"):
        compute_advantages("grpo", rewards, mask, n_samples_per_prompt=2, values=torch.zeros(4, 3))
    with pytest.raises(ValueError, match="gamma=0.9"):
        compute_advantages("rloo", rewards, mask, n_samples_per_prompt=2, gamma=0.9)
    with pytest.raises(ValueError, match="must divide batch=4"):
        compute_advantages("grpo", rewards, mask, n_samples_per_prompt=3)
    with pytest.raises(ValueError, match=">= 2"):
        compute_advantages("grpo", rewards, mask, n_samples_per_prompt=1)
    with pytest.raises(ValueError, match="kl_coef"):
        compute_advantages("reinforce", rewards, mask, kl_coef=0.1)
