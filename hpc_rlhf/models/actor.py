"""The one loader of HF causal LMs (policy, reference, teacher, rollout replica) for every
recipe, optionally with LoRA (or QLoRA on GPU)."""
from __future__ import annotations

import os

import torch

from hpc_rlhf.models.lora import LoraSpec, apply_lora, quantization_config


def load_actor(path: str | os.PathLike, *, dtype: torch.dtype = torch.float32,
               lora: LoraSpec | None = None, attn_implementation: str | None = None,
               **from_pretrained_kwargs):
    """`AutoModelForCausalLM` from a local directory, LoRA-wrapped when lora.rank > 0 (QLoRA:
    loaded in 4 bits first; raises a clear error on CPU)."""
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


def config_dtype(model_cfg) -> torch.dtype:
    """model.dtype as a torch dtype; bf16 loads as fp32 on a machine without CUDA (the
    supervised recipes train fp32 there; the RL recipe loads fp32 and lets DeepSpeed cast)."""
    dtype = getattr(torch, model_cfg.dtype)
    if dtype == torch.bfloat16 and not torch.cuda.is_available():
        dtype = torch.float32
    return dtype


def load_causal_lm(path: str, model_cfg, *, trained: bool = False,
                   dtype: torch.dtype | None = None):
    """An HF causal LM from a config path ('tiny:llama', 'embedded:...', a hub name or a
    directory) with the config's attention implementation and trust_remote_code.
    trained=True: the model a recipe trains, LoRA-wrapped when model.lora_rank > 0 (only the
    adapters train; the export merges them). Frozen models (reference, teacher, rollout
    replica) never are. dtype: None = config_dtype(model_cfg)."""
    from hpc_rlhf.models.resolve import attn_implementation, resolve_model_path
    lora = LoraSpec.of(model_cfg) if trained else None
    return load_actor(resolve_model_path(path), dtype=dtype or config_dtype(model_cfg), lora=lora,
                      attn_implementation=attn_implementation(model_cfg.attn_implementation),
                      trust_remote_code=model_cfg.trust_remote_code)
