"""Export a trained model to a plain HF directory (safetensors + config + tokenizer).

Loadable by `AutoModelForCausalLM.from_pretrained` and vLLM. LoRA adapters are merged into the
base weights; ZeRO-3 / AutoTP shards are gathered. Written atomically (temp dir + rename).

CLI (merge an adapter into its base model):
    python -m hpc_rlhf.checkpoint.export --base BASE_DIR --adapter ADAPTER_DIR --out OUT_DIR
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path
from typing import Iterable

import torch
import torch.distributed as dist

from hpc_rlhf.models.lora import lora_scalings, merge_lora_state

MAX_SHARD_BYTES = 4 * 2**30


def unwrap(module: torch.nn.Module) -> torch.nn.Module:
    """engine -> module; our ValueModel -> its HF model (keeps a peft wrapper, if any)."""
    module = getattr(module, "module", module)
    return getattr(module, "hf", module)


def hf_state(module: torch.nn.Module, named: Iterable[tuple[str, torch.Tensor]]) -> dict:
    """Plain HF names -> tensors; merges LoRA when `module` is a peft model."""
    from_value_model = hasattr(getattr(module, "module", module), "hf")
    named = ((n[len("hf."):] if from_value_model and n.startswith("hf.") else n, t)
             for n, t in named)
    inner = unwrap(module)
    scalings = lora_scalings(inner)
    if scalings or hasattr(inner, "peft_config"):
        return merge_lora_state(named, scalings)
    return dict(named)


def _base_hf_model(module):
    inner = unwrap(module)
    return inner.get_base_model() if hasattr(inner, "get_base_model") else inner


def write_safetensors(state: dict, out: Path, max_shard_bytes: int = MAX_SHARD_BYTES) -> None:
    """HF layout: model.safetensors, or model-0000k-of-0000n.safetensors + index json."""
    from safetensors.torch import save_file
    shards, current, size = [], {}, 0
    for name in sorted(state):
        t = state[name].detach().contiguous().cpu()
        nbytes = t.numel() * t.element_size()
        if current and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[name] = t
        size += nbytes
    shards.append(current)
    if len(shards) == 1:
        save_file(shards[0], out / "model.safetensors", metadata={"format": "pt"})
        return
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, out / fname, metadata={"format": "pt"})
        weight_map.update({k: fname for k in shard})
    total = sum(t.numel() * t.element_size() for t in state.values())
    (out / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))


def save_hf_dir(state: dict, config, out_dir: str | os.PathLike, tokenizer=None,
                generation_config=None, dtype: torch.dtype | None = None) -> Path:
    """Atomically write state + config (+ tokenizer) as an HF model directory."""
    out = Path(out_dir)
    tmp = out.with_name(f".tmp-{out.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    if getattr(config, "tie_word_embeddings", False):
        state = {k: v for k, v in state.items() if k != "lm_head.weight"}
    if dtype is not None:
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
        config.dtype = dtype
    write_safetensors(state, tmp)
    config.save_pretrained(tmp)
    if generation_config is not None:
        generation_config.save_pretrained(tmp)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out


def export_hf(model_or_engine, out_dir: str | os.PathLike, tokenizer=None, *, strategy=None,
              dtype: torch.dtype | None = None) -> Path | None:
    """Export to a plain HF directory; merges LoRA. Collective when `strategy` is given
    (ZeRO-3 / AutoTP gather): every rank calls it, rank 0 writes. Returns the dir on rank 0."""
    if strategy is not None:
        named = strategy.gathered_state(model_or_engine)
    else:
        named = ((n, p.detach()) for n, p in getattr(model_or_engine, "module",
                                                     model_or_engine).named_parameters())
    state = hf_state(model_or_engine, named)   # every rank consumes the collective iterator
    if dist.is_initialized() and dist.get_rank() != 0:
        return None
    base = _base_hf_model(model_or_engine)
    return save_hf_dir(state, base.config, out_dir, tokenizer,
                       getattr(base, "generation_config", None), dtype)


def merge_adapter(base_dir: str | os.PathLike, adapter_dir: str | os.PathLike,
                  out_dir: str | os.PathLike, dtype: torch.dtype = torch.float32) -> Path:
    """Merge a saved peft LoRA adapter into its base model and write a plain HF directory."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=dtype)
    model = PeftModel.from_pretrained(base, adapter_dir)
    tok_dir = adapter_dir if (Path(adapter_dir) / "tokenizer_config.json").exists() else base_dir
    tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    return export_hf(model, out_dir, tokenizer)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description="Merge a LoRA adapter into its base model (HF dir).")
    p.add_argument("--base", required=True, help="base model directory (HF)")
    p.add_argument("--adapter", required=True, help="peft adapter directory")
    p.add_argument("--out", required=True, help="output directory (written atomically)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    args = p.parse_args(argv)
    print(merge_adapter(args.base, args.adapter, args.out, getattr(torch, args.dtype)))


if __name__ == "__main__":
    main()
