"""Actor and reference models: HF causal LMs, optionally with LoRA (or QLoRA on GPU)."""
from __future__ import annotations

import os

import torch

from hpc_rlhf.models.lora import LoraSpec, apply_lora, quantization_config


def load_actor(path: str | os.PathLike, *, dtype: torch.dtype = torch.float32,
               lora: LoraSpec | None = None, attn_implementation: str | None = None,
               **from_pretrained_kwargs):
    """The trainable policy: `AutoModelForCausalLM`, LoRA-wrapped when lora.rank > 0."""
    from transformers import AutoModelForCausalLM
    lora = lora or LoraSpec()
    kwargs = dict(dtype=dtype, **from_pretrained_kwargs)
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    qcfg = quantization_config(lora)  # raises on CPU when qlora=True
    if qcfg is not None:
        kwargs["quantization_config"] = qcfg
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    return apply_lora(model, lora)


def load_reference(path: str | os.PathLike, *, dtype: torch.dtype = torch.float32,
                   **from_pretrained_kwargs):
    """The frozen reference policy (no LoRA, no grads, eval mode)."""
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **from_pretrained_kwargs)
    return model.requires_grad_(False).eval()
