"""On CUDA: the torch ring-attention kernel against torch SDPA, and one training step's
throughput for a ~0.5B Llama in bf16 (tokens/s and model FLOPs utilisation)."""
import time

import pytest
import torch
import torch.nn.functional as F

from gpulib import record
from hpc_rlhf.ring_attn import RingLayout, ring_attention

pytestmark = pytest.mark.gpu

H200_BF16_PEAK = 989e12  # dense bf16 tensor-core peak of an H100/H200 SXM (FLOP/s)


def test_torch_ring_kernel_matches_sdpa_on_cuda():
    torch.manual_seed(0)
    cu = (0, 100, 130, 256)
    q, k, v = (torch.randn(cu[-1], h, 64, device="cuda", dtype=torch.bfloat16) for h in (8, 2, 2))
    out = ring_attention(q, k, v, RingLayout(cu, 1)).float()
    want = torch.empty_like(out)
    for a, b in zip(cu[:-1], cu[1:]):  # each packed sequence on its own, causal, GQA repeated
        qs, ks, vs = (t[a:b].transpose(0, 1) for t in (q, k.repeat_interleave(4, 1),
                                                      v.repeat_interleave(4, 1)))
        want[a:b] = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True).transpose(0, 1).float()
    err = (out - want).abs().max().item()
    assert err < 2e-2, err
    record("ring attention (torch kernel) vs SDPA, bf16", "ok", f"max abs diff {err:.2e}")


def test_half_billion_llama_train_step_throughput():
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                      num_attention_heads=16, num_key_value_heads=16, vocab_size=32000,
                      max_position_embeddings=2048, attn_implementation="sdpa")
    model = LlamaForCausalLM(cfg).to("cuda", torch.bfloat16)
    params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
    batch, seq = 16, 1024
    x = torch.randint(0, cfg.vocab_size, (batch, seq), device="cuda")

    def step():
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    n, t0 = 5, time.perf_counter()
    for _ in range(n):
        loss = step()
    torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / n
    tokens = batch * seq
    flops = 6 * params * tokens + 12 * cfg.num_hidden_layers * cfg.hidden_size * seq * tokens / 2
    mfu = flops / dt / H200_BF16_PEAK
    assert torch.isfinite(loss) and mfu > 0.05, (dt, mfu)
    record("train step, %.2fB Llama bf16 (16x1024 tokens)" % (params / 1e9), "ok",
           f"{tokens / dt:,.0f} tokens/s, {flops / dt / 1e12:.0f} TFLOP/s, MFU {mfu:.1%}")
