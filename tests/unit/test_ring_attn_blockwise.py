"""Block attention + log-sum-exp merge (the math each ring step does) against plain causal
attention, in one process. Tolerance: float64, 1e-12."""
import pytest
import torch

from hpc_rlhf.ring_attn import RingLayout, ring_attention, ring_attention_forward, select_backend
from hpc_rlhf.ring_attn.blockwise import block_backward, block_forward, merge_blocks

pytestmark = pytest.mark.unit


def naive_packed_attention(q, k, v, cu_seqlens):
    """[T, H, D] queries, [T, Hkv, D] keys/values; causal inside each sample."""
    T, H, D = q.shape
    k = k.repeat_interleave(H // k.shape[1], dim=1)
    v = v.repeat_interleave(H // v.shape[1], dim=1)
    seg = torch.zeros(T, dtype=torch.long)
    for i, s in enumerate(cu_seqlens[1:-1]):
        seg[s:] = i + 1
    allowed = (seg[:, None] == seg[None, :]) & torch.ones(T, T, dtype=torch.bool).tril()
    scores = torch.einsum("qhd,khd->hqk", q, k) / D ** 0.5
    return torch.einsum("hqk,khd->qhd", scores.masked_fill(~allowed, float("-inf")).softmax(-1), v)


def _grouped(x, kv_heads):  # [T, H, D] -> [Hkv, G, T, D]
    T, H, D = x.shape
    return x.reshape(T, kv_heads, H // kv_heads, D).permute(1, 2, 0, 3)


@pytest.mark.parametrize("q_chunk", [3, 1024])
def test_blocks_merged_in_any_order_equal_full_attention(q_chunk):
    torch.manual_seed(0)
    cu, T, H, Hkv, D = [0, 9, 10, 23, 31], 31, 4, 2, 8
    q, k, v = (torch.randn(T, h, D, dtype=torch.float64) for h in (H, Hkv, Hkv))
    dout = torch.randn(T, H, D, dtype=torch.float64)
    layout = RingLayout(tuple(cu), world=1)
    pos, seg = layout.token_index(0)[:T], layout.segment_ids(0)[:T]
    qg, kh, vh, dog = _grouped(q, Hkv), k.permute(1, 0, 2), v.permute(1, 0, 2), _grouped(dout, Hkv)

    blocks = [(20, 31), (0, 7), (7, 20)]  # key blocks visited out of order, like a ring does
    out = lse = None
    for a, b in blocks:
        o, l = block_forward(qg, kh[:, a:b], vh[:, a:b], pos, seg, pos[a:b], seg[a:b], D ** -0.5, q_chunk)
        out, lse = (o, l) if out is None else merge_blocks(out, lse, o, l)
    qr, kr, vr = (t.clone().requires_grad_() for t in (q, k, v))
    ref = naive_packed_attention(qr, kr, vr, cu)
    got = out.permute(2, 0, 1, 3).reshape(T, H, D)
    assert (got - ref).abs().max() < 1e-12

    dq_ref, dk_ref, dv_ref = torch.autograd.grad(ref, (qr, kr, vr), dout)
    delta = (dog * out).sum(-1)
    dq, dk, dv = torch.zeros_like(qg), torch.zeros_like(kh), torch.zeros_like(vh)
    for a, b in blocks:
        gq, gk, gv = block_backward(qg, kh[:, a:b], vh[:, a:b], dog, lse, delta, pos, seg,
                                    pos[a:b], seg[a:b], D ** -0.5, q_chunk)
        dq += gq
        dk[:, a:b] += gk
        dv[:, a:b] += gv
    assert (dq.permute(2, 0, 1, 3).reshape(T, H, D) - dq_ref).abs().max() < 1e-12
    assert (dk.permute(1, 0, 2) - dk_ref).abs().max() < 1e-12
    assert (dv.permute(1, 0, 2) - dv_ref).abs().max() < 1e-12


def test_fully_masked_block_leaves_merge_unchanged():
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 1, 4, 8), torch.randn(1, 3, 8), torch.randn(1, 3, 8)
    pos, seg = torch.arange(4), torch.zeros(4, dtype=torch.long)
    o, l = block_forward(q, k, v, pos, seg, torch.arange(10, 13), torch.zeros(3, dtype=torch.long), 1.0)
    assert torch.isinf(l).all() and (o == 0).all()  # all keys are in the future
    base_o, base_l = torch.randn(1, 1, 4, 8), torch.randn(1, 1, 4)
    mo, ml = merge_blocks(base_o, base_l, o, l)
    assert torch.equal(mo, base_o) and torch.allclose(ml, base_l)


def test_single_process_ring_attention_with_gqa_and_bf16():
    torch.manual_seed(0)
    cu, T = [0, 5, 17], 17
    q, k, v = (torch.randn(T, h, 16, dtype=torch.float64) for h in (6, 2, 2))
    ref = naive_packed_attention(q, k, v, cu)
    out = ring_attention(q, k, v, RingLayout(tuple(cu), 1))
    assert (out - ref).abs().max() < 1e-12
    out16 = ring_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), RingLayout(tuple(cu), 1))
    assert out16.dtype == torch.bfloat16 and (out16.double() - ref).abs().max() < 3e-2


def test_ring_attention_refuses_mismatched_layout_and_shapes():
    q = torch.randn(8, 4, 16)
    with pytest.raises(ValueError, match="layout.world=2"):
        ring_attention(q, q, q, RingLayout((0, 8), 2))
    with pytest.raises(ValueError, match="divisible by Hkv"):
        ring_attention(q, torch.randn(8, 3, 16), torch.randn(8, 3, 16), RingLayout((0, 8), 1))
    with pytest.raises(ValueError, match="layout.local_len=9"):
        ring_attention(q, q, q, RingLayout((0, 9), 1))


def test_hf_ring_attention_needs_a_scope():
    q = torch.randn(1, 2, 8, 16)
    with pytest.raises(RuntimeError, match="ring_attention_scope"):
        ring_attention_forward(torch.nn.Module(), q, q, q, None)


def test_backend_falls_back_to_torch_with_a_reason_on_cpu():
    choice = select_backend("auto", "cpu")
    assert choice.name == "torch" and "CUDA" in choice.reason
    assert select_backend("torch").name == "torch"
    with pytest.raises(RuntimeError, match="not usable"):
        select_backend("flash", "cpu")
    with pytest.raises(ValueError, match="must be one of"):
        select_backend("fast")
