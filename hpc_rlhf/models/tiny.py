"""Deterministic tiny Llama / Qwen2 models with a character tokenizer, for tests and CI.

No hub: the model and its tokenizer are built in-process and saved as a plain HF directory that
transformers, DeepSpeed and vLLM all load. head_dim is 64, the smallest vLLM's CPU attention
serves. `python -m hpc_rlhf.models.tiny OUT_DIR [--arch qwen2]` writes one.
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>", "<|user|>", "<|assistant|>", "<|system|>"]
# Printable ASCII plus newline, written as byte-level BPE symbols (space is 'Ġ', newline 'Ċ'):
# with no merges this is a character tokenizer that Qwen2's tokenizer class (which
# AutoTokenizer and vLLM pick for qwen2 models) rebuilds identically from tokenizer.json.
CHARS = [chr(256 + 10)] + [chr(256 + 32)] + [chr(c) for c in range(33, 127)]

# A chat template in the usual HF (jinja) form, so `apply_chat_template` works as for real models.
CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'system' %}<|system|>{{ m['content'] }}"
    "{% elif m['role'] == 'user' %}<|user|>{{ m['content'] }}"
    "{% else %}<|assistant|>{{ m['content'] }}</s>{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)

ARCHS = ("llama", "qwen2")


def build_tokenizer():
    """A character-level `PreTrainedTokenizerFast` (one token per character) with a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + CHARS)}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
        unk_token="<unk>", additional_special_tokens=SPECIAL_TOKENS[4:])
    tok.chat_template = CHAT_TEMPLATE
    return tok


def tiny_config(arch: str = "llama", *, hidden_size: int = 128, num_layers: int = 2,
                num_heads: int = 2, num_kv_heads: int | None = None, vocab_size: int = 128,
                max_position_embeddings: int = 512, tie_word_embeddings: bool = False):
    """The HF config of a tiny model; vocab_size must cover the tokenizer (103 tokens)."""
    if arch not in ARCHS:
        raise ValueError(f"arch={arch!r} is not a tiny model architecture; use one of {ARCHS}")
    if vocab_size < len(SPECIAL_TOKENS) + len(CHARS):
        raise ValueError(f"vocab_size={vocab_size} is smaller than the tokenizer "
                         f"({len(SPECIAL_TOKENS) + len(CHARS)} tokens)")
    common = dict(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers, num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads or num_heads, max_position_embeddings=max_position_embeddings,
        bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=tie_word_embeddings,
        rms_norm_eps=1e-6)
    if arch == "llama":
        from transformers import LlamaConfig
        return LlamaConfig(head_dim=hidden_size // num_heads, **common)
    from transformers import Qwen2Config
    return Qwen2Config(**common)


def build_tiny_model(out_dir: str | os.PathLike, arch: str = "llama", seed: int = 0,
                     **config_kwargs) -> Path:
    """Write a random float32 tiny causal LM + tokenizer to `out_dir` (same seed, same weights).

    arch: a dense one (tiny_config) or a mixture-of-experts one in MOE_ARCHS (tiny_moe_config;
    `output_router_logits=True` on its forward returns the load-balancing `aux_loss`).
    """
    from hpc_rlhf.models.cache import in_world, run_clean
    if in_world():  # save_pretrained writes nothing on a rank that is not 0: build outside
        run_clean("hpc_rlhf.models.tiny", out_dir, "--arch", arch, "--seed", str(seed),
                  "--config-json", json.dumps(config_kwargs))
        return Path(out_dir)
    import torch
    from transformers import AutoModelForCausalLM

    moe = arch in MOE_ARCHS
    config = (tiny_moe_config if moe else tiny_config)(arch, **config_kwargs)
    if config.vocab_size < len(SPECIAL_TOKENS) + len(CHARS):
        raise ValueError(f"vocab_size={config.vocab_size} is smaller than the tokenizer "
                         f"({len(SPECIAL_TOKENS) + len(CHARS)} tokens)")
    if config.hidden_size // config.num_attention_heads != 64:
        raise ValueError("tiny models need head_dim 64 (vLLM's CPU attention minimum): "
                         f"hidden_size={config.hidden_size} / num_heads={config.num_attention_heads}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    build_tokenizer().save_pretrained(out)
    meta = {"arch": arch, "seed": seed, **({"moe": True} if moe else {}), **config_kwargs}
    (out / "hpc_rlhf_tiny.json").write_text(json.dumps(meta))
    return out


def ensure_tiny_model(cache_dir: str | os.PathLike, arch: str = "llama", seed: int = 0) -> Path:
    """Build the tiny model (dense or MoE) into `cache_dir/tiny-<arch>-<seed>-<key>` once; later
    calls reuse it (hpc_rlhf.models.cache: locked, checked to load, keyed by this file).
    """
    from hpc_rlhf.models.cache import build_key, cached_build
    key = build_key(__file__)
    out = Path(cache_dir) / f"tiny-{arch}-{seed}-{key}"
    return cached_build(out, key, lambda tmp: build_tiny_model(tmp, arch=arch, seed=seed))


MOE_ARCHS = ("mixtral", "qwen3_moe", "qwen2_moe")


def tiny_moe_config(arch: str = "mixtral", *, hidden_size: int = 128, num_layers: int = 2,
                    num_heads: int = 2, num_experts: int = 4, top_k: int = 2,
                    expert_size: int = 64, vocab_size: int = 128,
                    max_position_embeddings: int = 512):
    """The HF config of a tiny mixture-of-experts model (every layer sparse, top-k routing)."""
    if arch not in MOE_ARCHS:
        raise ValueError(f"arch={arch!r} is not a tiny MoE architecture; use one of {MOE_ARCHS}")
    if not 0 < top_k <= num_experts:
        raise ValueError(f"top_k={top_k} must be in [1, num_experts={num_experts}]")
    common = dict(
        vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=num_layers,
        num_attention_heads=num_heads, num_key_value_heads=num_heads,
        head_dim=hidden_size // num_heads,
        max_position_embeddings=max_position_embeddings, bos_token_id=1, eos_token_id=2,
        pad_token_id=0, tie_word_embeddings=False, rms_norm_eps=1e-6, num_experts_per_tok=top_k)
    if arch == "mixtral":
        from transformers import MixtralConfig
        return MixtralConfig(num_local_experts=num_experts, intermediate_size=expert_size, **common)
    moe = dict(num_experts=num_experts, moe_intermediate_size=expert_size, decoder_sparse_step=1,
               intermediate_size=2 * hidden_size, norm_topk_prob=True)
    if arch == "qwen3_moe":
        from transformers import Qwen3MoeConfig
        return Qwen3MoeConfig(**moe, **common)
    from transformers import Qwen2MoeConfig  # has a shared expert besides the routed ones
    return Qwen2MoeConfig(shared_expert_intermediate_size=expert_size, **moe, **common)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out_dir")
    p.add_argument("--arch", choices=ARCHS + MOE_ARCHS, default="llama")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--config-json", default="{}", help="extra tiny_config arguments as JSON")
    args = p.parse_args(argv)
    print(build_tiny_model(args.out_dir, args.arch, args.seed, **json.loads(args.config_json)))


if __name__ == "__main__":
    main()
