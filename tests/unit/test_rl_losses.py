"""Policy/value losses and entropy vs naive per-token references (values and gradients).

The references are written token by token with scalar torch ops so autograd gives their
gradients. Tolerances: atol 1e-5 for float32, 1e-10 for float64.
"""
import itertools
import math
import random

import pytest
import torch

from hpc_rlhf.algos.losses import (
    aggregate_loss,
    entropy_from_logits,
    masked_mean,
    masked_sum,
    policy_loss,
    value_loss,
)

pytestmark = pytest.mark.unit

ATOL = {torch.float32: 1e-5, torch.float64: 1e-10}


def random_mask(batch, resp_len, rng):
    rows = []
    for i in range(batch):
        row = [0] * resp_len
        if i % 4 == 0:
            row = [1] * resp_len
        elif i % 4 in (1, 2):
            length = rng.randint(1, resp_len)
            row[:length] = [1] * length
            if i % 4 == 2 and length >= 4:  # env-feedback hole
                row[1 : length - 1] = [1 if rng.random() < 0.5 else 0 for _ in range(length - 2)]
        rows.append(row)  # i % 4 == 3: all masked
    return torch.tensor(rows, dtype=torch.long)


def positions(mask_row):
    return [t for t, m in enumerate(mask_row.tolist()) if m]


def naive_aggregate(per_tok, batch, resp_len, agg, max_len):
    """per_tok: dict (row, t) -> scalar tensor."""
    if agg == "token_mean":
        if not per_tok:
            return torch.tensor(0.0)
        return sum(per_tok.values()) / len(per_tok)
    if agg == "seq_mean_token_mean":
        rows = []
        for i in range(batch):
            toks = [v for (r, _), v in per_tok.items() if r == i]
            if toks:
                rows.append(sum(toks) / len(toks))
        return sum(rows) / len(rows) if rows else torch.tensor(0.0)
    norm = resp_len if max_len is None else max_len
    return sum(per_tok.values()) / (batch * norm) if per_tok else torch.tensor(0.0)


def naive_policy_loss(
    logp, old, adv, mask, lo, hi, dual, agg, importance, rollout, tis_cap, icepop, max_len
):
    batch, resp_len = logp.shape
    per_tok = {}
    for i in range(batch):
        pos = positions(mask[i])
        if importance == "sequence" and pos:
            seq_log_ratio = sum(logp[i, t] - old[i, t] for t in pos) / len(pos)
        for t in pos:
            if importance == "token":
                ratio = torch.exp(logp[i, t] - old[i, t])
            else:  # GSPO-token: value s_i, gradient through this token's logp only
                ratio = torch.exp(seq_log_ratio.detach() + logp[i, t] - logp[i, t].detach())
            a = adv[i, t]
            obj = torch.minimum(ratio * a, torch.clamp(ratio, 1 - lo, 1 + hi) * a)
            if dual is not None and a.item() < 0:
                obj = torch.maximum(obj, dual * a)
            loss = -obj
            if tis_cap is not None or icepop is not None:
                rho = math.exp(old[i, t].item() - rollout[i, t].item())
                weight = rho if tis_cap is None else min(rho, tis_cap)
                if icepop is not None and not (icepop[0] <= rho <= icepop[1]):
                    weight = 0.0
                loss = loss * weight
            per_tok[(i, t)] = loss
    return naive_aggregate(per_tok, batch, resp_len, agg, max_len)


def make_inputs(dtype, seed, batch=8, resp_len=10):
    rng, gen = random.Random(seed), torch.Generator().manual_seed(seed)
    mask = random_mask(batch, resp_len, rng)
    old = -torch.rand(batch, resp_len, generator=gen, dtype=dtype) * 4
    logp = old + torch.randn(batch, resp_len, generator=gen, dtype=dtype) * 0.3
    adv = torch.randn(batch, resp_len, generator=gen, dtype=dtype)
    rollout = old + torch.randn(batch, resp_len, generator=gen, dtype=dtype) * 0.5
    return logp, old, adv, mask, rollout


CASES = list(
    itertools.product(
        ["token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"],
        ["token", "sequence"],
        [None, 3.0],  # dual clip
        ["none", "tis", "icepop", "both"],
    )
)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("agg,importance,dual,correction", CASES)
def test_policy_loss_and_grad_match_naive(dtype, agg, importance, dual, correction):
    logp, old, adv, mask, rollout = make_inputs(dtype, seed=len(agg) + len(correction))
    tis_cap = 1.5 if correction in ("tis", "both") else None
    icepop = (0.7, 1.4) if correction in ("icepop", "both") else None
    # GSPO's sequence ratios sit close to 1: it uses clip ranges of ~3e-4 (paper's values).
    lo, hi = (0.2, 0.28) if importance == "token" else (3e-4, 4e-4)
    max_len = 16 if agg == "seq_mean_token_sum_norm" else None

    x = logp.clone().requires_grad_(True)
    loss, metrics = policy_loss(
        x, old, adv, mask, clip_eps_low=lo, clip_eps_high=hi, dual_clip=dual, loss_agg=agg,
        importance=importance, rollout_logp=rollout if correction != "none" else None,
        tis_cap=tis_cap, icepop=icepop, max_len=max_len,
    )
    loss.backward()

    y = logp.clone().requires_grad_(True)
    ref = naive_policy_loss(y, old, adv, mask, lo, hi, dual, agg, importance, rollout, tis_cap, icepop, max_len)
    ref.backward()

    atol = ATOL[dtype]
    assert loss.dtype == dtype
    torch.testing.assert_close(loss.detach(), ref.detach().to(dtype), atol=atol, rtol=0)
    torch.testing.assert_close(x.grad, y.grad, atol=atol, rtol=0)
    assert all(torch.isfinite(v) for v in metrics.values())
    if correction in ("tis", "both"):
        assert 0 < metrics["tis_clip_frac"] < 1
    if correction in ("icepop", "both"):
        assert 0 < metrics["icepop_masked_frac"] < 1
    assert 0 < metrics["clip_frac"] < 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gspo_gradient_equals_sequence_level_objective(dtype):
    """Per-row advantage + seq_mean_token_mean: the paper's objective with s_i = exp(mean log r)."""
    logp, old, _, mask, _ = make_inputs(dtype, seed=11)
    gen = torch.Generator().manual_seed(11)
    adv_seq = torch.randn(logp.shape[0], generator=gen, dtype=dtype)
    adv = adv_seq[:, None].expand_as(logp).contiguous()

    x = logp.clone().requires_grad_(True)
    loss, _ = policy_loss(x, old, adv, mask, clip_eps_low=3e-4, clip_eps_high=4e-4,
                          importance="sequence", loss_agg="seq_mean_token_mean")
    loss.backward()

    y = logp.clone().requires_grad_(True)
    row_losses = []
    for i in range(logp.shape[0]):
        pos = positions(mask[i])
        if not pos:
            continue
        s = torch.exp(sum(y[i, t] - old[i, t] for t in pos) / len(pos))
        a = adv_seq[i]
        row_losses.append(-torch.minimum(s * a, torch.clamp(s, 1 - 3e-4, 1 + 4e-4) * a))
    ref = sum(row_losses) / len(row_losses)
    ref.backward()
    torch.testing.assert_close(loss.detach(), ref.detach(), atol=ATOL[dtype], rtol=0)
    torch.testing.assert_close(x.grad, y.grad, atol=ATOL[dtype], rtol=0)


def test_clip_fraction_equals_hand_count():
    # ratio, advantage -> is the clipped branch the active one? (eps_low 0.2, eps_high 0.28)
    tokens = [
        (1.5, 1.0, True),  # above 1 + 0.28 with A > 0: clipped
        (1.5, -1.0, False),  # above with A < 0: unclipped ratio is the pessimistic one
        (0.5, -1.0, True),  # below 0.8 with A < 0: clipped
        (0.5, 1.0, False),  # below with A > 0: unclipped
        (1.25, 1.0, False),  # inside the clip-higher band (would be clipped at eps 0.2)
        (1.1, -2.0, False),  # inside
    ]
    padded = (3.0, 1.0)  # would be clipped but is padding
    ratios = torch.tensor([[r for r, _, _ in tokens] + [padded[0]]], dtype=torch.float64)
    adv = torch.tensor([[a for _, a, _ in tokens] + [padded[1]]], dtype=torch.float64)
    mask = torch.tensor([[1] * len(tokens) + [0]])
    old = torch.full_like(ratios, -1.0)
    _, metrics = policy_loss(old + ratios.log(), old, adv, mask, clip_eps_low=0.2, clip_eps_high=0.28)
    hand = sum(c for _, _, c in tokens) / len(tokens)
    assert metrics["clip_frac"].item() == pytest.approx(hand)  # 2 / 6
    assert metrics["ratio_max"].item() == pytest.approx(1.5)

    # dual clip at 3: ratio 5 with A = -1 gives -5 < -3, so the dual bound is active.
    ratios2 = torch.tensor([[5.0, 5.0, 2.0]], dtype=torch.float64)
    adv2 = torch.tensor([[-1.0, 1.0, -1.0]], dtype=torch.float64)
    loss, m2 = policy_loss(old[:, :3] + ratios2.log(), old[:, :3], adv2, torch.ones(1, 3), dual_clip=3.0)
    assert m2["dual_clip_frac"].item() == pytest.approx(1 / 3)
    assert loss.item() == pytest.approx((3.0 - 1.2 + 2.0) / 3)


def test_rollout_correction_metrics_hand_count():
    old = torch.zeros(1, 5, dtype=torch.float64)
    rho = torch.tensor([[0.5, 0.9, 1.0, 1.3, 2.5]], dtype=torch.float64)
    rollout = old - rho.log()
    logp = old.clone().requires_grad_(True)
    adv = torch.ones(1, 5, dtype=torch.float64)
    loss, m = policy_loss(logp, old, adv, torch.ones(1, 5), rollout_logp=rollout,
                          tis_cap=2.0, icepop=(0.8, 2.2))
    assert m["tis_clip_frac"].item() == pytest.approx(1 / 5)
    assert m["icepop_masked_frac"].item() == pytest.approx(2 / 5)
    # ratio 1, A 1: per-token loss -1 times weights [0, 0.9, 1.0, 1.3, 0]; token mean over 5.
    assert loss.item() == pytest.approx(-(0.9 + 1.0 + 1.3) / 5)


def test_policy_loss_no_nan_with_masked_rows_and_inf_padding():
    logp, old, adv, mask, rollout = make_inputs(torch.float32, seed=3)
    logp = torch.where(mask.bool(), logp, torch.tensor(-math.inf))
    old = torch.where(mask.bool(), old, torch.tensor(math.inf))
    for m in (mask, torch.zeros_like(mask)):
        for agg, imp in itertools.product(
            ["token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"], ["token", "sequence"]
        ):
            x = logp.clone().requires_grad_(True)
            loss, metrics = policy_loss(x, old, adv, m, loss_agg=agg, importance=imp,
                                        rollout_logp=rollout, tis_cap=2.0, icepop=(0.5, 2.0))
            loss.backward()
            assert torch.isfinite(loss) and torch.isfinite(x.grad).all()
            assert all(torch.isfinite(v) for v in metrics.values())
            assert x.grad[m == 0].abs().sum() == 0


def test_policy_loss_rejects_bad_arguments():
    logp, old, adv, mask, _ = make_inputs(torch.float32, seed=0)
    with pytest.raises(ValueError, match="rollout_logp"):
        policy_loss(logp, old, adv, mask, tis_cap=2.0)
    with pytest.raises(ValueError, match="dual_clip"):
        policy_loss(logp, old, adv, mask, dual_clip=0.5)
    with pytest.raises(ValueError, match="token_mean"):
        policy_loss(logp, old, adv, mask, loss_agg="mean")
    with pytest.raises(ValueError, match="token, sequence"):
        policy_loss(logp, old, adv, mask, importance="seq")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("clip_eps", [None, 0.1])
@pytest.mark.parametrize("agg", ["token_mean", "seq_mean_token_mean"])
def test_value_loss_matches_naive(dtype, clip_eps, agg):
    rng, gen = random.Random(9), torch.Generator().manual_seed(9)
    mask = random_mask(8, 6, rng)
    old_v = torch.randn(8, 6, generator=gen, dtype=dtype)
    values = old_v + torch.randn(8, 6, generator=gen, dtype=dtype) * 0.3
    returns = torch.randn(8, 6, generator=gen, dtype=dtype)
    x = values.clone().requires_grad_(True)
    loss, metrics = value_loss(x, old_v, returns, mask, clip_eps=clip_eps, loss_agg=agg)
    loss.backward()

    y = values.clone().requires_grad_(True)
    per_tok, n_clip = {}, 0
    for i in range(8):
        for t in positions(mask[i]):
            sq = (y[i, t] - returns[i, t]) ** 2
            if clip_eps is not None:
                vc = old_v[i, t] + torch.clamp(y[i, t] - old_v[i, t], -clip_eps, clip_eps)
                sq_c = (vc - returns[i, t]) ** 2
                n_clip += int(sq_c.item() > sq.item())
                sq = torch.maximum(sq, sq_c)
            per_tok[(i, t)] = 0.5 * sq
    ref = naive_aggregate(per_tok, 8, 6, agg, None)
    ref.backward()
    torch.testing.assert_close(loss.detach(), ref.detach().to(dtype), atol=ATOL[dtype], rtol=0)
    torch.testing.assert_close(x.grad, y.grad, atol=ATOL[dtype], rtol=0)
    assert metrics["value_clip_frac"].item() == pytest.approx(n_clip / len(per_tok))
    if clip_eps is not None:
        assert n_clip > 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_entropy_matches_naive_in_chunks(dtype):
    gen = torch.Generator().manual_seed(2)
    logits = torch.randn(3, 7, 11, generator=gen, dtype=dtype) * 3
    logits[0, 0, 0] = 40.0  # near one-hot
    x = logits.clone().requires_grad_(True)
    ent = entropy_from_logits(x, chunk_size=5)  # 21 positions: chunks 5,5,5,5,1
    naive = torch.zeros(3, 7, dtype=torch.float64)
    for b in range(3):
        for t in range(7):
            z = [math.exp(v) for v in logits[b, t].double().tolist()]
            p = [v / sum(z) for v in z]
            naive[b, t] = -sum(pi * math.log(pi) for pi in p if pi > 0)
    torch.testing.assert_close(ent.detach().double(), naive, atol=ATOL[dtype], rtol=0)
    weights = torch.randn(3, 7, generator=gen, dtype=dtype)
    (ent * weights).sum().backward()
    y = logits.clone().requires_grad_(True)
    (torch.distributions.Categorical(logits=y).entropy() * weights).sum().backward()
    torch.testing.assert_close(x.grad, y.grad, atol=ATOL[dtype], rtol=1e-6)


def test_entropy_bf16_is_float32():
    out = entropy_from_logits(torch.randn(2, 3, 5).bfloat16())
    assert out.dtype == torch.float32 and out.shape == (2, 3)


def test_masked_helpers():
    x = torch.tensor([[1.0, 2.0, math.nan], [4.0, math.inf, 6.0]])
    m = torch.tensor([[1, 1, 0], [0, 0, 0]])
    assert masked_sum(x, m).item() == 3.0
    assert masked_mean(x, m).item() == 1.5
    torch.testing.assert_close(masked_mean(x, m, dim=-1), torch.tensor([1.5, 0.0]))
    torch.testing.assert_close(masked_sum(x, m, dim=-1), torch.tensor([3.0, 0.0]))
    assert masked_mean(x, torch.zeros_like(m)).item() == 0.0
    assert aggregate_loss(x, torch.zeros_like(m), "seq_mean_token_mean").item() == 0.0
    with pytest.raises(ValueError, match="loss_agg"):
        aggregate_loss(x, m, "sum")
