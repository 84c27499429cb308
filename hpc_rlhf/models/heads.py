"""Critic and reward model: a causal LM backbone plus a scalar value head.

Stored as a standard HF `*ForSequenceClassification` with num_labels=1 (its `score` Linear is
the value head), so save/load is plain `save_pretrained` / `from_pretrained` and the export is
servable as a reward model. `ValueModel` wraps it to return a value for *every* position (the
critic needs per-token values; HF's own forward pools the last token only).

LoRA (`load_value_model(..., lora=LoraSpec(rank=r))`): peft wraps the HF model as a
PeftModelForSequenceClassification; adapters and the `score` head train, the base is frozen.
The backbone and head are looked up on peft's base model (peft injects its layers in place),
and `checkpoint.export.export_hf` merges the adapters into a plain HF value model.
"""
from __future__ import annotations

import os

import torch
from torch import nn

from hpc_rlhf.data.packing import position_ids_from_mask
from hpc_rlhf.models.lora import LoraSpec, apply_lora, quantization_config


class ValueModel(nn.Module):
    """values = score(backbone(input_ids)) per token: [b, T] float32."""

    def __init__(self, hf_model: nn.Module):
        super().__init__()
        self.hf = hf_model
        self.config = hf_model.config

    @property
    def hf_base(self) -> nn.Module:
        """The HF *ForSequenceClassification (under the peft wrapper, when LoRA is on)."""
        return self.hf.get_base_model() if hasattr(self.hf, "get_base_model") else self.hf

    @property
    def backbone(self) -> nn.Module:
        # peft's PeftModel also answers `base_model_prefix` (forwarded to the HF model), but
        # getattr(peft, "model") is then the whole *ForSequenceClassification, not its trunk.
        base = self.hf_base
        return getattr(base, base.base_model_prefix)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, use_cache: bool = False
                ) -> torch.Tensor:
        """Padded rows (attention_mask) or packed rows (position_ids restart per sample, no
        mask), as an HF causal LM takes them; `use_cache` is accepted for that call shape."""
        if position_ids is None:
            if attention_mask is None:
                raise ValueError("ValueModel needs attention_mask or position_ids")
            position_ids = position_ids_from_mask(attention_mask)
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask,
                               position_ids=position_ids, use_cache=False).last_hidden_state
        return self.hf_base.score(hidden).squeeze(-1).float()  # [b, T]; peft: trained copy

    def save_pretrained(self, out_dir: str | os.PathLike, **kwargs) -> None:
        self.hf.save_pretrained(out_dir, **kwargs)


def load_value_model(path: str | os.PathLike, *, dtype: torch.dtype = torch.float32,
                     lora: LoraSpec | None = None, **from_pretrained_kwargs) -> ValueModel:
    """Critic/RM from a causal LM or a saved value model. A causal LM's lm_head is dropped and
    a fresh `score` head (HF init, seeded by the torch RNG) is added. With `lora.rank > 0` only
    the adapters and the `score` head are trainable."""
    from transformers import AutoModelForSequenceClassification
    if lora is not None and lora.qlora:   # raises on CPU, as for the actor
        from_pretrained_kwargs["quantization_config"] = quantization_config(lora)
    hf = AutoModelForSequenceClassification.from_pretrained(
        path, num_labels=1, dtype=dtype, **from_pretrained_kwargs)
    if hf.config.pad_token_id is None:
        raise ValueError(f"{path}: config.pad_token_id is None; a value model needs it (set it "
                         "to the tokenizer's pad token id in config.json)")
    if lora is not None and lora.rank:
        hf = apply_lora(hf, lora, task_type="SEQ_CLS")  # peft keeps `score` trainable
    return ValueModel(hf)


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last real token per row (left or right padding): [b, T] -> [b]."""
    seq = attention_mask.shape[1]
    return seq - 1 - attention_mask.long().flip(-1).argmax(-1)


def sequence_rewards(values: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Reward-model score = the value at the last real token: [b, T] -> [b]."""
    idx = last_token_index(attention_mask)
    return values.gather(1, idx[:, None]).squeeze(1)


def response_values(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                    response_len: int) -> torch.Tensor:
    """Critic values V(state before each response token): [b, response_len].

    Aligned with `response_logprobs`: column k is the value at the position whose logits
    predict response token k.
    """
    values = model(input_ids=input_ids, attention_mask=attention_mask)   # [b, T]
    return values[:, -(response_len + 1):-1]
