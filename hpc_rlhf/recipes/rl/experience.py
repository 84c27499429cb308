"""Rollouts -> padded training tensors, and the distributed pieces of advantage estimation.

Layout of a batch (what `hpc_rlhf.engine.logprobs.response_logprobs` expects):

    input_ids      [B, P + R]  left-padded prompt | response, right-padded
    attention_mask [B, P + R]  1 on real tokens
    action_mask    [B, R]      1 on tokens the policy produced (0: padding, env feedback)
    rollout_logp   [B, R]      the engine's logprobs of those tokens

P is the longest prompt and R the longest response of the batch; `Batch.rows` trims both
again per micro-batch (rl/micro.py) so short micro-batches do not pay for the longest sample.
"""
from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Sequence

import torch

from hpc_rlhf.algos.masked import masked_sum
from hpc_rlhf.topology import collectives


@dataclass
class Batch:
    input_ids: torch.Tensor        # [B, P + R] long
    attention_mask: torch.Tensor   # [B, P + R] long
    action_mask: torch.Tensor      # [B, R] bool
    rollout_logp: torch.Tensor     # [B, R] float32
    rewards: torch.Tensor          # [B] float32 sequence rewards
    # Filled in by the experience maker:
    old_logp: torch.Tensor | None = None     # [B, R] policy logprobs before this step's updates
    ref_logp: torch.Tensor | None = None     # [B, R] reference-model logprobs
    values: torch.Tensor | None = None       # [B, R] critic values
    advantages: torch.Tensor | None = None   # [B, R]
    returns: torch.Tensor | None = None      # [B, R]

    @property
    def size(self) -> int:
        return self.input_ids.shape[0]

    @property
    def response_len(self) -> int:
        return self.action_mask.shape[1]

    def rows(self, index: torch.Tensor | slice) -> "Batch":
        """A sub-batch of rows, trimmed to its own longest prompt and response."""
        parts = {f.name: (getattr(self, f.name)[index] if getattr(self, f.name) is not None
                          else None) for f in fields(self)}
        return _trim(Batch(**parts))


def _trim(b: Batch) -> Batch:
    R = b.response_len
    resp_cols = b.action_mask.any(0).nonzero()
    keep_r = int(resp_cols.max()) + 1 if resp_cols.numel() else 1
    # Response padding at the right; prompt padding at the left of the prompt part.
    prompt_mask = b.attention_mask[:, : b.input_ids.shape[1] - R]
    real_prompt = prompt_mask.any(0).nonzero()
    drop_p = int(real_prompt.min()) if real_prompt.numel() else 0
    total = b.input_ids.shape[1]
    cols = slice(drop_p, total - (R - keep_r))
    out = {}
    for f in fields(b):
        t = getattr(b, f.name)
        if t is None or t.dim() == 1:
            out[f.name] = t
        elif t.shape[1] == total:
            out[f.name] = t[:, cols]
        else:  # response-shaped [B, R]
            out[f.name] = t[:, :keep_r]
    return Batch(**out)


def make_batch(prompt_ids: Sequence[Sequence[int]], response_ids: Sequence[Sequence[int]],
               rollout_logp: Sequence[torch.Tensor], rewards: torch.Tensor, pad_id: int,
               action_masks: Sequence[Sequence[int]] | None = None) -> Batch:
    """Pad prompts left and responses right into one Batch (see module doc).

    action_masks: per response token 1 (policy) / 0 (environment feedback in multi-turn
    rollouts; its logprob entries are ignored). Default: all 1.
    """
    B = len(prompt_ids)
    if not (len(response_ids) == len(rollout_logp) == rewards.numel() == B):
        raise ValueError(f"make_batch: {B} prompts, {len(response_ids)} responses, "
                         f"{len(rollout_logp)} logprob rows, {rewards.numel()} rewards")
    P = max(len(p) for p in prompt_ids)
    R = max(max((len(r) for r in response_ids), default=1), 1)
    input_ids = torch.full((B, P + R), pad_id, dtype=torch.long)
    attn = torch.zeros((B, P + R), dtype=torch.long)
    action = torch.zeros((B, R), dtype=torch.bool)
    logp = torch.zeros((B, R), dtype=torch.float32)
    for i, (p, r) in enumerate(zip(prompt_ids, response_ids)):
        input_ids[i, P - len(p):P] = torch.as_tensor(p, dtype=torch.long)
        attn[i, P - len(p):P + len(r)] = 1
        if r:
            input_ids[i, P:P + len(r)] = torch.as_tensor(r, dtype=torch.long)
            logp[i, :len(r)] = torch.as_tensor(rollout_logp[i], dtype=torch.float32)
            mask = action_masks[i] if action_masks is not None else [1] * len(r)
            action[i, :len(r)] = torch.as_tensor(mask, dtype=torch.bool)
    return Batch(input_ids, attn, action, logp, rewards.float().reshape(B))


def distributed_whiten(adv: torch.Tensor, mask: torch.Tensor, group=None,
                       eps: float = 1e-8) -> torch.Tensor:
    """`global_normalize` over every data-parallel rank's tokens together (REINFORCE++)."""
    stats = torch.stack([masked_sum(adv, mask), masked_sum(adv * adv, mask),
                         mask.sum().to(adv.dtype)]).double()
    stats = collectives.all_reduce(stats, "sum", group)
    total, total_sq, count = stats.tolist()
    if count == 0:
        return adv
    mean = total / count
    var = max(total_sq / count - mean * mean, eps)  # same formula as global_normalize
    out = (adv - mean) / var ** 0.5
    return torch.where(mask.bool(), out, torch.zeros_like(out))


def with_fields(batch: Batch, **kwargs) -> Batch:
    return replace(batch, **kwargs)
