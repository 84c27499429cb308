"""Samples -> TokenBatch for each trainer, and which samples each rank reads at each step.

Every rank holds the whole (tokenized) dataset and reads its share by index: the order of an
epoch is a seeded permutation, optimizer step k takes the next `batch_size` indices, and data-
parallel rank r takes its contiguous slice, split into micro-batches.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from hpc_rlhf.data.packing import TokenBatch, collate
from hpc_rlhf.data.samples import KTOSample, PairSample, PRMSample, SFTSample


def sft_batch(samples: Sequence[SFTSample], *, pad_id: int, packing: bool = False,
              row_capacity: int = 0) -> TokenBatch:
    return collate([s.input_ids for s in samples], [s.loss_mask for s in samples],
                   pad_id=pad_id, packing=packing, row_capacity=row_capacity)


def prompt_response_batch(prompts: Sequence[list[int]], responses: Sequence[list[int]], *,
                          pad_id: int, packing: bool = False, row_capacity: int = 0) -> TokenBatch:
    """Segment i = prompts[i] + responses[i], targets on the response tokens."""
    seqs = [p + r for p, r in zip(prompts, responses)]
    masks = [[0] * len(p) + [1] * len(r) for p, r in zip(prompts, responses)]
    return collate(seqs, masks, pad_id=pad_id, packing=packing, row_capacity=row_capacity)


def pair_batch(samples: Sequence[PairSample], **kw) -> TokenBatch:
    """Segments 0..n-1: prompt + chosen; segments n..2n-1: prompt + rejected (same order)."""
    prompts = [s.prompt_ids for s in samples] * 2
    responses = [s.chosen_ids for s in samples] + [s.rejected_ids for s in samples]
    return prompt_response_batch(prompts, responses, **kw)


def kto_batch(samples: Sequence[KTOSample], **kw) -> tuple[TokenBatch, torch.Tensor]:
    """(batch, desirable [n] bool)."""
    batch = prompt_response_batch([s.prompt_ids for s in samples],
                                  [s.response_ids for s in samples], **kw)
    return batch, torch.tensor([s.desirable for s in samples], dtype=torch.bool)


def prm_batch(samples: Sequence[PRMSample], *, pad_id: int, packing: bool = False,
              row_capacity: int = 0) -> tuple[TokenBatch, torch.Tensor, torch.Tensor]:
    """(batch, flat index of every step placeholder [k], step labels [k]: int64 class ids, or
    float32 P(good) when any sample has soft labels)."""
    batch = collate([s.input_ids for s in samples], [[0] * len(s) for s in samples],
                    pad_id=pad_id, packing=packing, row_capacity=row_capacity)
    flat_seg = batch.segment_ids.reshape(-1)
    first = torch.full((len(samples),), flat_seg.numel(), dtype=torch.long)
    keep = flat_seg >= 0
    first = first.scatter_reduce(0, flat_seg[keep], torch.arange(flat_seg.numel())[keep], "amin")
    pos = torch.tensor([int(first[i]) + p for i, s in enumerate(samples)
                        for p in s.step_positions], dtype=torch.long)
    flat = [lab for s in samples for lab in s.step_labels]
    soft = any(isinstance(x, float) for x in flat)     # P(good) per step, else class ids
    labels = torch.tensor(flat, dtype=torch.float32 if soft else torch.long)
    return batch, pos, labels


def step_indices(num_samples: int, batch_size: int, step: int, seed: int) -> list[int]:
    """The `batch_size` sample indices of optimizer step `step` (epochs reshuffle by seed)."""
    out: list[int] = []
    start = step * batch_size
    while len(out) < batch_size:
        epoch, offset = divmod(start + len(out), num_samples)
        g = torch.Generator().manual_seed(seed + epoch)
        perm = torch.randperm(num_samples, generator=g).tolist()
        out.extend(perm[offset:offset + batch_size - len(out)])
    return out


def rank_micro_batches(indices: Sequence[int], dp_rank: int, dp_size: int,
                       micro_batch_size: int) -> list[list[int]]:
    """This rank's slice of a step's indices, cut into micro-batches."""
    if len(indices) % (dp_size * micro_batch_size):
        raise ValueError(f"batch of {len(indices)} samples is not divisible by data-parallel "
                         f"size {dp_size} x micro_batch_size {micro_batch_size}; set "
                         "train.batch_size to a multiple of their product")
    per_rank = len(indices) // dp_size
    mine = list(indices[dp_rank * per_rank:(dp_rank + 1) * per_rank])
    return [mine[i:i + micro_batch_size] for i in range(0, per_rank, micro_batch_size)]
