"""LoRA adapters via peft, QLoRA loading (GPU only), and merging adapters into base weights.

`merge_lora_state` works on a plain name -> tensor mapping (what `gathered_state` yields for a
ZeRO-3 / AutoTP engine), so export and weight sync merge without an unsharded model in memory.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Iterable

import torch

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PEFT_PREFIX = "base_model.model."
_LORA_PARAM = re.compile(r"^(?P<mod>.+)\.lora_(?P<ab>[AB])\.(?P<adapter>[^.]+)\.weight$")


@dataclass(frozen=True)
class LoraSpec:
    """LoRA hyper-parameters (rank 0 disables LoRA)."""
    rank: int = 0                        # adapter rank r; 0 = full fine-tuning
    alpha: float = 16.0                  # scaling = alpha / rank
    dropout: float = 0.0
    targets: tuple[str, ...] = field(default=DEFAULT_TARGETS)  # module name suffixes
    qlora: bool = False                  # load the base in 4 bit (bitsandbytes, CUDA only)

    def __post_init__(self):
        if self.rank < 0 or self.alpha <= 0 or not 0 <= self.dropout < 1:
            raise ValueError(f"LoraSpec rank={self.rank} must be >= 0, alpha={self.alpha} > 0, "
                             f"dropout={self.dropout} in [0, 1)")
        if self.rank and not self.targets:
            raise ValueError("LoraSpec.targets is empty: name the modules to adapt, e.g. q_proj")
        if self.qlora and not self.rank:
            raise ValueError("LoraSpec.qlora=True needs rank > 0 (QLoRA trains adapters only)")

    @classmethod
    def of(cls, model_cfg) -> "LoraSpec | None":
        """config.ModelConfig's model.lora_* / load_in_4bit, or None when model.lora_rank=0;
        every trainer's trained model (policy, critic, reward model) uses it."""
        if not model_cfg.lora_rank:
            return None
        return cls(rank=model_cfg.lora_rank, alpha=model_cfg.lora_alpha,
                   dropout=model_cfg.lora_dropout, targets=tuple(model_cfg.lora_targets),
                   qlora=model_cfg.load_in_4bit)


def quantization_config(spec: LoraSpec):
    """The 4-bit BitsAndBytesConfig for QLoRA, or None; clear error where it cannot run."""
    if not spec.qlora:
        return None
    if not torch.cuda.is_available():
        raise RuntimeError("lora.qlora=True needs a CUDA GPU (bitsandbytes 4-bit kernels); this "
                           "machine has none. Set lora.qlora=false (plain LoRA runs on CPU).")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as e:
        raise ImportError("lora.qlora=True needs bitsandbytes: pip install bitsandbytes") from e
    from transformers import BitsAndBytesConfig
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                              bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=torch.bfloat16)


def apply_lora(model: torch.nn.Module, spec: LoraSpec, *, task_type: str = "CAUSAL_LM"):
    """Wrap `model` with fresh LoRA adapters; only adapter weights stay trainable.

    task_type "SEQ_CLS" also keeps a value/score head trainable (peft modules_to_save).
    """
    if not spec.rank:
        return model
    from peft import LoraConfig, get_peft_model
    if spec.qlora:
        from peft import prepare_model_for_kbit_training
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    cfg = LoraConfig(r=spec.rank, lora_alpha=spec.alpha, lora_dropout=spec.dropout,
                     target_modules=list(spec.targets), task_type=task_type, bias="none")
    return get_peft_model(model, cfg)


def lora_scalings(model: torch.nn.Module) -> dict[str, float]:
    """{module name without the peft prefix: scaling} for every LoRA layer of `model`."""
    out = {}
    for name, mod in model.named_modules():
        scaling = getattr(mod, "scaling", None)
        if isinstance(scaling, dict) and hasattr(mod, "lora_A"):
            for adapter, s in scaling.items():
                out[f"{_strip(name)}#{adapter}"] = float(s)
    return out


def _strip(name: str) -> str:
    return name[len(PEFT_PREFIX):] if name.startswith(PEFT_PREFIX) else name


def merge_lora_state(named: Iterable[tuple[str, torch.Tensor]], scalings: dict[str, float],
                     ) -> dict[str, torch.Tensor]:
    """Base-model state dict with W <- W + scaling * B @ A for every adapter.

    `named`: peft names (…q_proj.base_layer.weight, …q_proj.lora_A.default.weight, …);
    `scalings`: from `lora_scalings(model)`. Non-LoRA names pass through (prefix stripped).
    """
    base, lora = {}, {}
    for name, t in named:
        name = _strip(name)
        m = _LORA_PARAM.match(name)
        if m:
            lora[(m["mod"], m["adapter"], m["ab"])] = t
        else:
            base[name.replace(".base_layer.", ".").replace(".modules_to_save.default.", ".")
                 if ".original_module." not in name else None] = t
    base.pop(None, None)
    for (mod, adapter, ab), a in lora.items():
        if ab != "A":
            continue
        b = lora[(mod, adapter, "B")]                            # [out, r] @ [r, in]
        key = f"{mod}.weight"
        w = base[key]
        delta = (b.float() @ a.float()) * scalings[f"{mod}#{adapter}"]
        base[key] = (w.float() + delta).to(w.dtype)
    return base
