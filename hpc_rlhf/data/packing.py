"""Token sequences -> model batches, padded or packed, and dynamic batching by token budget.

Packed rows hold several samples back to back with position ids restarting at 0 for each and
*no* 2-D attention mask: transformers (>= 4.5x, 5.x) then derives a block-diagonal causal
mask from the position ids (sdpa / eager: `find_packed_sequence_indices`; flash-attention 2:
the varlen path), so no token attends across a sample boundary. That detection is skipped
when a KV cache is passed, so packed forwards must use `use_cache=False` (`model_inputs` does).

Conventions for every batch: `loss_mask[b, t] = 1` means token t is a *target*, predicted by
the logits at t - 1 (so t is never the first token of a sample); `segment_ids[b, t]` is the
index of the sample the token belongs to (-1 on padding).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass
class TokenBatch:
    input_ids: torch.Tensor             # [b, T] int64
    position_ids: torch.Tensor          # [b, T] int64, restart at 0 per sample
    attention_mask: torch.Tensor | None  # [b, T] 0/1 (padded batches); None when packed
    loss_mask: torch.Tensor             # [b, T] float32, 1 on target tokens
    segment_ids: torch.Tensor           # [b, T] int64, sample index, -1 on padding
    num_samples: int

    def model_inputs(self) -> dict:
        """Keyword arguments for an HF causal LM forward."""
        out = {"input_ids": self.input_ids, "position_ids": self.position_ids,
               "use_cache": False}
        if self.attention_mask is not None:
            out["attention_mask"] = self.attention_mask
        return out

    def to(self, device) -> "TokenBatch":
        move = (lambda t: None if t is None else t.to(device))
        return TokenBatch(move(self.input_ids), move(self.position_ids),
                          move(self.attention_mask), move(self.loss_mask),
                          move(self.segment_ids), self.num_samples)

    @property
    def num_tokens(self) -> int:
        return int((self.segment_ids >= 0).sum())


def pack_rows(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """First-fit assignment of samples (by index, order kept inside a row) to rows of at most
    `capacity` tokens; a sample longer than `capacity` gets a row of its own."""
    rows: list[list[int]] = []
    free: list[int] = []
    for i, n in enumerate(lengths):
        for r, room in enumerate(free):
            if n <= room:
                rows[r].append(i)
                free[r] -= n
                break
        else:
            rows.append([i])
            free.append(capacity - n)
    return rows


def collate(seqs: Sequence[Sequence[int]], loss_masks: Sequence[Sequence[int]] | None = None,
            *, pad_id: int, packing: bool = False, row_capacity: int = 0) -> TokenBatch:
    """Build one batch from token sequences (sample i -> segment i).

    packing=False: one right-padded row per sample with a 2-D attention mask.
    packing=True: samples share rows of `row_capacity` tokens (0 = the longest sample);
    padding at the end of a row continues as its own pseudo-sample (positions from 0), which
    attends to nothing real and is never a target.
    """
    if not seqs:
        raise ValueError("collate needs at least one sequence")
    if loss_masks is None:
        loss_masks = [[0] + [1] * (len(s) - 1) for s in seqs]
    for i, (s, m) in enumerate(zip(seqs, loss_masks)):
        if len(s) != len(m) or not s:
            raise ValueError(f"sample {i}: {len(s)} tokens but {len(m)} loss-mask entries "
                             "(need equal, non-zero lengths)")
    lengths = [len(s) for s in seqs]
    if packing:
        rows = pack_rows(lengths, max(row_capacity, max(lengths)))
    else:
        rows = [[i] for i in range(len(seqs))]
    width = max(sum(lengths[i] for i in row) for row in rows)
    shape = (len(rows), width)
    ids = torch.full(shape, pad_id, dtype=torch.long)
    pos = torch.zeros(shape, dtype=torch.long)
    lmask = torch.zeros(shape, dtype=torch.float32)
    seg = torch.full(shape, -1, dtype=torch.long)
    for r, row in enumerate(rows):
        t = 0
        for i in row:
            n = lengths[i]
            ids[r, t:t + n] = torch.tensor(seqs[i], dtype=torch.long)
            pos[r, t:t + n] = torch.arange(n)
            lmask[r, t:t + n] = torch.tensor(loss_masks[i], dtype=torch.float32)
            seg[r, t:t + n] = i
            t += n
        pos[r, t:] = torch.arange(width - t)
    lmask[pos == 0] = 0.0   # a sample's first token has no prediction inside the sample
    attn = None if packing else (seg >= 0).long()
    return TokenBatch(ids, pos, attn, lmask, seg, len(seqs))


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counted over real tokens only, so left padding does not shift them: [b, T].

    Pad positions get 0 (their outputs are masked anyway); the first real token gets 0.
    """
    positions = attention_mask.long().cumsum(-1) - 1        # [b, T]
    return positions.clamp_(min=0)


def segment_sum(values: torch.Tensor, segment_ids: torch.Tensor, num_segments: int) -> torch.Tensor:
    """Sum of `values` ([b, T]) over each segment: [num_segments]; padding (-1) is ignored."""
    flat_v, flat_s = values.reshape(-1), segment_ids.reshape(-1)
    keep = flat_s >= 0
    out = torch.zeros(num_segments, dtype=values.dtype, device=values.device)
    return out.index_add(0, flat_s[keep], flat_v[keep])


def segment_last_index(segment_ids: torch.Tensor, num_segments: int) -> torch.Tensor:
    """Flat index (into a [b * T] view) of the last token of each segment: [num_segments]."""
    flat = segment_ids.reshape(-1)
    idx = torch.arange(flat.numel(), device=flat.device)
    out = torch.full((num_segments,), -1, dtype=torch.long, device=flat.device)
    keep = flat >= 0
    return out.scatter_reduce(0, flat[keep], idx[keep], reduce="amax")


def token_budget_batches(lengths: Sequence[int], max_tokens: int, *,
                         packing: bool = False) -> list[list[int]]:
    """Split samples (in order) into micro-batches whose cost stays within `max_tokens`.

    Cost: the sum of lengths when packing, else (samples x longest sample), the padded size.
    A sample longer than the budget gets a micro-batch of its own.
    """
    if max_tokens <= 0:
        raise ValueError(f"max_tokens={max_tokens} must be > 0 (train.max_tokens_per_micro_batch)")
    batches: list[list[int]] = []
    cur: list[int] = []
    total = longest = 0
    for i, n in enumerate(lengths):
        new_total, new_longest = total + n, max(longest, n)
        cost = new_total if packing else new_longest * (len(cur) + 1)
        if cur and cost > max_tokens:
            batches.append(cur)
            cur, new_total, new_longest = [], n, n
        cur.append(i)
        total, longest = new_total, new_longest
    if cur:
        batches.append(cur)
    return batches
