"""RL micro-batching (rl/micro.py): token-budget micro-batches cover every sample once, stay
within the budget, and their loss shares make the weighted micro-batch losses equal the loss of
the whole optimizer step, for every loss aggregation (checked on the real policy loss)."""
import random

import pytest
import torch

from hpc_rlhf.algos.losses import LOSS_AGGS, aggregate_loss, policy_loss
from hpc_rlhf.recipes.rl.experience import make_batch
from hpc_rlhf.recipes.rl.micro import budget_split, split_to_count, train_steps

pytestmark = pytest.mark.unit


def _batch(n: int, seed: int, max_prompt: int = 9, max_resp: int = 12):
    rng = random.Random(seed)
    prompts = [[rng.randrange(3, 50) for _ in range(rng.randint(2, max_prompt))] for _ in range(n)]
    resps = [[rng.randrange(3, 50) for _ in range(rng.randint(0 if i % 7 == 3 else 1, max_resp))]
             for i in range(n)]
    logps = [torch.randn(len(r)) for r in resps]
    return make_batch(prompts, resps, logps, torch.randn(n), pad_id=0)


def _padded(p, r, group):
    return len(group) * (max(p[i] for i in group) + max(r[i] for i in group))


@pytest.mark.parametrize("budget", [1, 20, 60, 200, 10_000])
def test_budget_split_covers_all_once_within_budget(budget):
    rng = random.Random(budget)
    p = [rng.randint(1, 12) for _ in range(40)]
    r = [rng.randint(0, 30) for _ in range(40)]
    groups = budget_split(p, r, budget)
    assert sorted(i for g in groups for i in g) == list(range(40))
    for g in groups:
        assert len(g) == 1 or _padded(p, r, g) <= budget, (g, budget)
    if budget == 10_000:
        assert len(groups) == 1
    # similar lengths together: response lengths never increase from one group to the next
    firsts = [r[g[0]] for g in groups]
    assert firsts == sorted(firsts, reverse=True)


@pytest.mark.parametrize("cap", [8, 30, 90])
def test_budget_split_response_cap(cap):
    """The auto budget also caps rows x longest response (the logit positions), so short
    prompts cannot pack more logit rows into a micro-batch than a fixed one holds."""
    rng = random.Random(cap)
    p = [rng.randint(1, 4) for _ in range(40)]    # short prompts: the token budget alone
    r = [rng.randint(1, 10) for _ in range(40)]   # would put everything in one micro-batch
    assert len(budget_split(p, r, 10_000)) == 1
    groups = budget_split(p, r, 10_000, cap)
    assert sorted(i for g in groups for i in g) == list(range(40))
    for g in groups:
        assert len(g) == 1 or len(g) * max(r[i] for i in g) <= cap, (g, cap)
    assert len(groups) >= sum(r) // cap   # the cap does bind


def test_budget_split_refuses_zero():
    with pytest.raises(ValueError, match="max_tokens_per_micro_batch=0"):
        budget_split([1], [1], 0)


def test_split_to_count_halves_costliest():
    groups = split_to_count([[0, 1, 2, 3], [4], [5, 6]], 5, cost=len)
    assert sorted(i for g in groups for i in g) == list(range(7)) and len(groups) == 5
    assert [len(g) for g in groups] == [2, 2, 1, 1, 1] or sorted(map(len, groups)) == [1, 1, 1, 2, 2]
    with pytest.raises(ValueError):
        split_to_count([[0], [1]], 3, cost=len)


def test_fixed_mode_is_shuffled_fixed_size_micro_batches():
    batch = _batch(12, 0)
    gen = torch.Generator().manual_seed(5)
    order = torch.randperm(12, generator=torch.Generator().manual_seed(5))
    steps = train_steps(batch, micro_batch_size=2, grad_accum=3, max_tokens=0,
                        loss_agg="token_mean", generator=gen)
    assert [len(s) for s in steps] == [3, 3]
    flat = [m for s in steps for m in s]
    for k, m in enumerate(flat):
        ref = batch.rows(order[2 * k:2 * k + 2])
        assert torch.equal(m.batch.input_ids, ref.input_ids)
        assert torch.equal(m.index, order[2 * k:2 * k + 2])
        assert m.weight is None and m.boundary is None


@pytest.mark.parametrize("loss_agg", LOSS_AGGS)
@pytest.mark.parametrize("importance", ["token", "sequence"])
def test_weighted_micro_losses_equal_whole_step_loss(loss_agg, importance):
    """sum_i w_i * policy_loss(micro_i) == policy_loss(chunk) for each optimizer step."""
    torch.manual_seed(0)
    batch = _batch(24, 1)
    B, R = batch.action_mask.shape
    logp_all = torch.randn(B, R) * 0.3 - 1
    old_all = logp_all + torch.randn(B, R) * 0.1
    adv_all = torch.randn(B, R)

    def loss_of(index, b):
        # per-row tensors of the full batch, trimmed like Batch.rows trims the response columns
        r = b.response_len
        return policy_loss(logp_all[index, :r], old_all[index, :r], adv_all[index, :r],
                           b.action_mask, clip_eps_low=0.2, clip_eps_high=0.28, dual_clip=3.0,
                           loss_agg=loss_agg, importance=importance, max_len=16)[0]

    gen = torch.Generator().manual_seed(3)
    order = torch.randperm(B, generator=torch.Generator().manual_seed(3))
    steps = train_steps(batch, micro_batch_size=4, grad_accum=3, max_tokens=40,
                        loss_agg=loss_agg, generator=gen)
    assert len(steps) == 2                       # 24 samples, 12 per optimizer step
    for k, micros in enumerate(steps):
        chunk = order[12 * k:12 * (k + 1)]
        assert len(micros) > 1 and micros[-1].boundary and not any(m.boundary for m in micros[:-1])
        assert sum(m.weight for m in micros) == pytest.approx(1.0, abs=1e-12)
        weighted = sum(m.weight * loss_of(m.index, m.batch) for m in micros)
        whole = loss_of(chunk, batch.rows(chunk))
        torch.testing.assert_close(weighted, whole, rtol=1e-5, atol=1e-6)
        assert sorted(torch.cat([m.index for m in micros]).tolist()) == sorted(chunk.tolist())


def test_aggregate_loss_shares_match_definition():
    """token_mean share = tokens / tokens: the weighted means of two halves give the whole."""
    torch.manual_seed(1)
    x = torch.randn(6, 5)
    mask = torch.rand(6, 5) > 0.4
    a, b = slice(0, 2), slice(2, 6)
    ta, tb = mask[a].sum().item(), mask[b].sum().item()
    whole = aggregate_loss(x, mask, "token_mean")
    parts = (ta * aggregate_loss(x[a], mask[a], "token_mean")
             + tb * aggregate_loss(x[b], mask[b], "token_mean")) / (ta + tb)
    torch.testing.assert_close(parts, whole)


def test_token_mean_scope_step_averages_over_the_step_tokens():
    """algorithm.token_mean_scope=step with fixed micro-batches: sum_i w_i * token_mean(micro_i)
    is OpenRLHF's step-level token mean (all the step's token losses / its token count); the
    default averages the micro-batches' own means, which differs when their token counts do."""
    torch.manual_seed(2)
    batch = _batch(12, 4)
    per_token = torch.randn(batch.action_mask.shape, dtype=torch.float64)
    mask = batch.action_mask.bool()

    def micro_mean(index):
        m = mask[index]
        return per_token[index][m].sum() / m.sum()

    gen = torch.Generator().manual_seed(7)
    order = torch.randperm(12, generator=torch.Generator().manual_seed(7))
    steps = train_steps(batch, micro_batch_size=2, grad_accum=3, max_tokens=0,
                        loss_agg="token_mean", generator=gen, step_shares=True)
    for k, micros in enumerate(steps):
        chunk = order[6 * k:6 * (k + 1)]
        assert micros[-1].boundary and not any(m.boundary for m in micros[:-1])
        weighted = sum(m.weight * micro_mean(m.index) for m in micros)
        openrlhf = per_token[chunk][mask[chunk]].sum() / mask[chunk].sum()   # naive peer form
        assert float(weighted) == pytest.approx(float(openrlhf), rel=1e-12)
        averaged = sum(micro_mean(m.index) for m in micros) / len(micros)   # our default
        assert float(averaged) != pytest.approx(float(openrlhf), rel=1e-6)
