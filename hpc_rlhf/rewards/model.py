"""Rewards from a trained reward model: `reward.source=model model.reward_model_path=DIR`.

DIR is a value model as `hpc_rlhf.models.heads` saves it (an HF *ForSequenceClassification
with num_labels=1) plus its tokenizer. The reward of a sample is the head's value at the last
token of query + response, the position the RM trainer scores.

Exactness: `score_ids(prompt_ids + response_ids)` scores the very tokens the policy produced
(prefer it when the loop has them). `score(batch)` re-tokenizes the prompt as the policy saw
it (chat template applied) + the response text, and appends eos when the text does not end
with it, since decoded responses lose their end-of-turn token while the RM was trained on
sequences that end with one. Labels are unused.
"""
from __future__ import annotations

import torch

from hpc_rlhf.rewards.base import RewardBatch, as_reward_tensor


class ModelReward:
    """`RewardSource` over a value model (per-token values [b, T]) and its tokenizer."""

    def __init__(self, model, tokenizer, *, batch_size: int = 8, append_eos: bool = True,
                 name: str = "reward model", normalize: tuple[float, float] | None = None):
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be >= 1")
        self.model, self.tokenizer = model, tokenizer
        self.batch_size, self.append_eos, self.name = batch_size, append_eos, name
        self.normalize = normalize  # (mean, std): scores become (r - mean) / std
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None \
            else tokenizer.eos_token_id
        if pad is None:
            raise ValueError(f"{name}: the tokenizer has neither a pad nor an eos token")
        self.pad_id = int(pad)

    @classmethod
    def from_path(cls, path: str, *, dtype: torch.dtype = torch.float32,
                  device: str | torch.device = "cpu", **kwargs) -> "ModelReward":
        from transformers import AutoTokenizer

        from hpc_rlhf.models.heads import load_value_model
        from hpc_rlhf.models.resolve import resolve_model_path
        local = resolve_model_path(path)
        model = load_value_model(local, dtype=dtype).to(device).eval()
        return cls(model, AutoTokenizer.from_pretrained(local), name=f"reward model {path}",
                   **kwargs)

    @classmethod
    def from_config(cls, cfg) -> "ModelReward":
        path = cfg.model.reward_model_path
        if not path:
            raise ValueError("reward.source='model' needs model.reward_model_path (a directory "
                             "written by the RM trainer)")
        cuda = torch.cuda.is_available()
        dtype = getattr(torch, cfg.model.dtype) if cuda else torch.float32
        norm = normalization_of(path) if cfg.reward.normalize else None
        return cls.from_path(path, dtype=dtype, device="cuda" if cuda else "cpu",
                             batch_size=cfg.train.micro_batch_size, normalize=norm)

    def __repr__(self) -> str:
        return f"ModelReward({self.name!r})"

    @torch.no_grad()
    def score_ids(self, sequences: list[list[int]]) -> torch.Tensor:
        """[B] float32: the value at each sequence's last token (sequences are unpadded ids)."""
        from hpc_rlhf.models.heads import sequence_rewards
        device = next(self.model.parameters()).device
        out = []
        for first in range(0, len(sequences), self.batch_size):
            batch = sequences[first:first + self.batch_size]
            width = max(len(s) for s in batch)
            ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for i, s in enumerate(batch):                                  # right padding
                if not s:
                    raise ValueError(f"sequence {first + i} is empty; nothing to score")
                ids[i, :len(s)] = torch.tensor(s)
                mask[i, :len(s)] = 1
            values = self.model(input_ids=ids.to(device), attention_mask=mask.to(device))  # [b,T]
            out.append(sequence_rewards(values, mask.to(device)).float().cpu())             # [b]
        flat = torch.cat(out) if out else torch.zeros(0)
        if self.normalize is not None:
            flat = (flat - self.normalize[0]) / self.normalize[1]
        return as_reward_tensor(flat, len(sequences), source=self.name,
                                fix="Check the reward model's weights (NaN/inf in its output).")

    def score(self, batch: RewardBatch) -> torch.Tensor:
        eos = self.tokenizer.eos_token_id
        seqs = []
        for q, r in zip(batch.prompts, batch.responses):
            ids = list(self.tokenizer(q + r, add_special_tokens=False)["input_ids"])
            if self.append_eos and eos is not None and (not ids or ids[-1] != eos):
                ids.append(int(eos))
            seqs.append(ids)
        return self.score_ids(seqs)


def normalization_of(path: str) -> tuple[float, float]:
    """(mean, std) recorded in a reward model's config.json ("mean" and "std", as our RM
    trainer with reward.normalize=true and OpenRLHF's --normalize_reward write them)."""
    import json
    from pathlib import Path

    from hpc_rlhf.models.resolve import resolve_model_path
    config = Path(resolve_model_path(path)) / "config.json"
    values = json.loads(config.read_text()) if config.is_file() else {}
    mean, std = values.get("mean"), values.get("std")
    if not isinstance(mean, (int, float)) or not isinstance(std, (int, float)) or std <= 0:
        raise ValueError(f"reward.normalize=true but {config} has no usable \"mean\"/\"std\" "
                         f"(mean={mean!r}, std={std!r}); train the reward model with "
                         "reward.normalize=true (or OpenRLHF's --normalize_reward), or set "
                         "reward.normalize=false")
    return float(mean), float(std)
