"""How one rank's RL batch is cut into micro-batches: a fixed number of samples each, or
dynamic micro-batches under a token budget (train.max_tokens_per_micro_batch).

Fixed (budget 0): micro-batches of train.micro_batch_size samples in a shuffled order;
DeepSpeed steps the optimizer every grad_accum of them and divides each loss by grad_accum.

Dynamic (budget > 0), one optimizer step at a time:
    chunk  = the next grad_accum * micro_batch_size samples of the shuffled order
    sort   = the chunk by response length, then prompt length (longest first)
    micros = greedy runs of the sorted chunk whose padded size (rows x (longest prompt +
             longest response), what Batch.rows trims to) stays <= budget, and rows x longest
             response (the logit positions) <= the response budget if one is set (auto, see
             config/rules.token_budget); a sample over the budget gets a micro-batch of its own
    equal  = every rank splits its largest micro-batches until all ranks have the same count
             (ZeRO-3 forwards and backwards are collective: unequal counts would hang)
    weight = each micro-batch's share of the chunk under the loss aggregation (below), so
             sum_i weight_i * loss(micro_i) == loss(chunk) whatever the split; the caller passes
             it to the backward instead of DeepSpeed's 1 / grad_accum

Sorting by length is what removes the padding: a micro-batch of similar lengths trims to
almost no padding. Shares per aggregation (train/losses.aggregate_loss):
    token_mean               action tokens of micro / action tokens of chunk
    seq_mean_token_mean      rows with action tokens of micro / those of chunk
    seq_mean_token_sum_norm  rows of micro / rows of chunk

With shared-prompt forwards (train.shared_prompt, rl/shared_prompt.py) the unit is a prompt's
group of n consecutive samples instead of a sample: groups are shuffled, and under a budget a
group costs its packed row (prompt + all its responses). Equalising the count may still split
a group; its halves then simply share less.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from hpc_rlhf.recipes.rl.experience import Batch
from hpc_rlhf.topology import collectives


@dataclass
class Micro:
    batch: Batch
    index: torch.Tensor     # [b] its rows in the step's batch
    weight: float | None    # loss weight (dynamic), None: DeepSpeed's 1 / grad_accum (fixed)
    boundary: bool | None   # last micro-batch of its optimizer step (dynamic), None: fixed


def real_lengths(batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """(prompt tokens [B], response tokens [B]) of each row (padding excluded)."""
    R = batch.response_len
    prompt = batch.attention_mask[:, :batch.input_ids.shape[1] - R].sum(1)
    response = batch.attention_mask[:, -R:].sum(1)
    return prompt, response


def budget_split(prompt_len: list[int], resp_len: list[int], max_tokens: int,
                 max_response_tokens: int = 0) -> list[list[int]]:
    """Positions (into the given lists) grouped into micro-batches of padded size <= max_tokens
    and, if max_response_tokens > 0, rows x longest response <= max_response_tokens (the logit
    positions), similar lengths together (see the module doc)."""
    if max_tokens <= 0:
        raise ValueError(f"train.max_tokens_per_micro_batch={max_tokens} must be > 0 here")
    order = sorted(range(len(resp_len)), key=lambda i: (-resp_len[i], -prompt_len[i], i))
    groups: list[list[int]] = []
    cur: list[int] = []
    max_p = max_r = 0
    for i in order:
        p, r = max(max_p, prompt_len[i]), max(max_r, resp_len[i])
        if cur and ((len(cur) + 1) * (p + r) > max_tokens
                    or 0 < max_response_tokens < (len(cur) + 1) * r):
            groups.append(cur)
            cur, p, r = [], prompt_len[i], resp_len[i]
        cur.append(i)
        max_p, max_r = p, r
    if cur:
        groups.append(cur)
    return groups


def padded_cost(prompt_len: list[int], resp_len: list[int]):
    """group -> its padded size: rows x (longest prompt + longest response)."""
    return lambda g: len(g) * (max(prompt_len[i] for i in g) + max(resp_len[i] for i in g))


def split_to_count(groups: list[list[int]], count: int, cost) -> list[list[int]]:
    """Halve the costliest splittable group until there are `count` groups (order of the
    halves kept). `cost(group) -> number`. Needs count <= number of items."""
    groups = [list(g) for g in groups]
    while len(groups) < count:
        splittable = [k for k, g in enumerate(groups) if len(g) > 1]
        if not splittable:
            raise ValueError(f"cannot make {count} micro-batches of {len(groups)} samples")
        k = max(splittable, key=lambda j: cost(groups[j]))
        g = groups[k]
        groups[k:k + 1] = [g[:len(g) // 2], g[len(g) // 2:]]
    return groups


def _max_over_world(counts: list[int]) -> list[int]:
    return collectives.reduce_values(counts, "max", dtype=torch.long)


def _shares(batch: Batch, groups: list[list[int]], loss_agg: str) -> list[float]:
    mask = batch.action_mask.bool()
    if loss_agg == "token_mean":
        amount = mask.sum(1).double()                       # [B] action tokens
    elif loss_agg == "seq_mean_token_mean":
        amount = mask.any(1).double()                       # [B] rows that count
    elif loss_agg == "seq_mean_token_sum_norm":
        amount = torch.ones(batch.size, dtype=torch.float64)
    else:
        raise ValueError(f"loss_agg={loss_agg!r} has no micro-batch share rule")
    total = float(sum(amount[g].sum() for g in groups))
    return [float(amount[g].sum()) / total if total > 0 else 0.0 for g in groups]


def budget_index_groups(batch: Batch, index: torch.Tensor, max_tokens: int,
                        max_response_tokens: int = 0) -> list[torch.Tensor]:
    """Rows `index` of `batch` in token-budget micro-batches, the count equalised over the
    world (collective). Returns index tensors into `batch`."""
    prompt, resp = real_lengths(batch)
    p, r = prompt[index].tolist(), resp[index].tolist()
    groups = budget_split(p, r, max_tokens, max_response_tokens)
    target = _max_over_world([len(groups)])[0]
    if target > len(groups):
        groups = split_to_count(groups, target,
                                padded_cost(p, r))
    return [index[torch.tensor(g, dtype=torch.long)] for g in groups]


def forward_groups(batch: Batch, micro_batch_size: int, max_tokens: int,
                   group: int = 1, max_response_tokens: int = 0) -> list[torch.Tensor]:
    """Row groups for the no-grad forwards of the experience maker, in batch order (fixed) or
    by token budget over the whole batch (collective when max_tokens > 0); group > 1 keeps a
    prompt's consecutive samples together under a budget (shared-prompt forwards)."""
    index = torch.arange(batch.size)
    if max_tokens <= 0:
        return [index[s:s + micro_batch_size] for s in range(0, batch.size, micro_batch_size)]
    if group <= 1 or batch.size % group:
        return budget_index_groups(batch, index, max_tokens, max_response_tokens)
    prompt, resp = real_lengths(batch)
    p, r = prompt.tolist(), resp.tolist()
    groups = _group_split(p, r, group, max_tokens, max_response_tokens)
    target = _max_over_world([len(groups)])[0]
    groups = split_to_count(groups, target, padded_cost(p, r))
    return [torch.tensor(g, dtype=torch.long) for g in groups]


def _grouped_order(size: int, group: int, generator) -> torch.Tensor:
    """A shuffled order of the rows that keeps each run of `group` consecutive rows (a prompt's
    samples) together and in order: groups are shuffled, not rows."""
    if group <= 1 or size % group:
        return (torch.randperm(size, generator=generator) if generator is not None
                else torch.arange(size))
    groups = (torch.randperm(size // group, generator=generator) if generator is not None
              else torch.arange(size // group))
    return (groups[:, None] * group + torch.arange(group)[None, :]).reshape(-1)


def _group_split(prompt: list[int], resp: list[int], group: int, max_tokens: int,
                 max_response_tokens: int = 0):
    """budget_split over whole groups of `group` consecutive positions: a group costs its
    shared-prompt row (prompt + all its responses)."""
    units = [list(range(k, min(k + group, len(resp)))) for k in range(0, len(resp), group)]
    unit_groups = budget_split([prompt[u[0]] for u in units],
                               [sum(resp[i] for i in u) for u in units], max_tokens,
                               max_response_tokens)
    return [[i for k in g for i in units[k]] for g in unit_groups]


def train_steps(batch: Batch, *, micro_batch_size: int, grad_accum: int, max_tokens: int,
                loss_agg: str, generator: torch.Generator | None = None,
                group: int = 1, step_shares: bool = False,
                max_response_tokens: int = 0) -> list[list[Micro]]:
    """The optimizer steps of one epoch over `batch`, each a list of Micro (see module doc).
    group > 1 (shared-prompt forwards): a prompt's `group` consecutive samples stay together
    in one micro-batch, and under a token budget a group costs its shared row. Collective when
    max_tokens > 0; max_response_tokens > 0 also caps rows x longest response per micro-batch
    (under a budget). step_shares (algorithm.token_mean_scope=step): fixed micro-batches are
    weighted by their share of the step too, so token_mean averages over the step's tokens (as
    OpenRLHF does) instead of averaging the micro-batches' means."""
    order = _grouped_order(batch.size, group, generator)
    if max_tokens <= 0:
        rows = [order[s:s + micro_batch_size] for s in range(0, batch.size, micro_batch_size)]
        steps = [rows[k:k + grad_accum] for k in range(0, len(rows), grad_accum)]
        if not step_shares:
            return [[Micro(batch.rows(ix), ix, None, None) for ix in step] for step in steps]
        return [[Micro(batch.rows(ix), ix, w, k == len(step) - 1)
                 for k, (ix, w) in enumerate(zip(step, _shares(batch, step, loss_agg)))]
                for step in steps]
    chunk = grad_accum * micro_batch_size
    prompt, resp = real_lengths(batch)
    chunks = [order[s:s + chunk] for s in range(0, batch.size, chunk)]
    if group > 1 and chunk % group == 0 and batch.size % group == 0:
        local = [_group_split(prompt[c].tolist(), resp[c].tolist(), group, max_tokens,
                              max_response_tokens) for c in chunks]
    else:
        local = [budget_split(prompt[c].tolist(), resp[c].tolist(), max_tokens,
                              max_response_tokens) for c in chunks]
    targets = _max_over_world([len(g) for g in local])   # one collective for all chunks
    steps = []
    for c, groups, target in zip(chunks, local, targets):
        p, r = prompt[c].tolist(), resp[c].tolist()
        groups = split_to_count(groups, target, padded_cost(p, r))
        rows = [c[torch.tensor(g, dtype=torch.long)] for g in groups]
        shares = _shares(batch, rows, loss_agg)
        steps.append([Micro(batch.rows(ix), ix, w, k == len(rows) - 1)
                      for k, (ix, w) in enumerate(zip(rows, shares))])
    return steps
