"""Ring attention on real gloo rings of 2 and 4 processes equals full causal attention on one
rank: outputs and q/k/v gradients, single and packed sequences, GQA, contiguous and balanced
layouts, and two rings of 2 inside a world of 4 (subgroups). Tolerances: float64 1e-10 (only summation order differs), float32 2e-5,
bfloat16 inputs 3e-2 (vs a float64 reference; bf16 rounding of inputs/outputs dominates)."""
import pytest
import torch
import torch.distributed as dist

from hpc_rlhf.ring_attn import RingLayout, gather_from_ring, ring_attention, run_local_ring

pytestmark = pytest.mark.distributed

TOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.bfloat16: 3e-2}

# (name, cu_seqlens, heads, kv_heads, balanced, dtype)
CASES = [
    ("single", [0, 40], 2, 2, False, torch.float64),
    ("single_balanced", [0, 40], 2, 2, True, torch.float64),
    ("packed_gqa", [0, 7, 8, 25, 41, 53], 4, 2, False, torch.float64),
    ("packed_gqa_balanced", [0, 7, 8, 25, 41, 53], 4, 2, True, torch.float64),
    ("packed_mqa_f32", [0, 3, 30, 31, 64], 4, 1, False, torch.float32),
    ("packed_balanced_f32", [0, 19, 20, 64], 4, 2, True, torch.float32),
    ("packed_bf16", [0, 10, 33], 2, 1, False, torch.bfloat16),
]


def naive_attention(q, k, v, cu_seqlens):
    """Full causal attention within each packed sample, written plainly. q [T,H,D], k/v [T,Hkv,D]."""
    T, H, D = q.shape
    group = H // k.shape[1]
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)
    out = torch.zeros_like(q)
    for s, e in zip(cu_seqlens[:-1], cu_seqlens[1:]):
        scores = torch.einsum("qhd,khd->hqk", q[s:e], k[s:e]) / D ** 0.5
        causal = torch.ones(e - s, e - s, dtype=torch.bool).tril()
        probs = scores.masked_fill(~causal, float("-inf")).softmax(-1)
        out[s:e] = torch.einsum("hqk,khd->qhd", probs, v[s:e])
    return out


def _check_cases(rank, world, group=None):
    """Max abs error per case on this rank. `group`: the ring (None = all ranks)."""
    errors = {}
    for name, cu, heads, kv_heads, balanced, dtype in CASES:
        torch.manual_seed(1234)  # same global tensors on every rank
        T, D = cu[-1], 16
        q, k, v = (torch.randn(T, h, D, dtype=torch.float64) for h in (heads, kv_heads, kv_heads))
        dout = torch.randn(T, heads, D, dtype=torch.float64)
        q, k, v = (t.to(dtype).to(torch.float64).requires_grad_() for t in (q, k, v))
        ref = naive_attention(q, k, v, cu)
        # scalar losses: autograd.grad with explicit grad tensors imports sympy (~2 s/process)
        dout = dout.to(dtype).to(torch.float64)
        ref_grads = torch.autograd.grad((ref * dout).sum(), (q, k, v))

        layout = RingLayout(tuple(cu), world, balanced)
        local = [layout.shard(t.detach(), rank, dim=0).to(dtype).requires_grad_() for t in (q, k, v)]
        out = ring_attention(*local, layout, group, q_chunk=5)
        local_dout = layout.shard(dout, rank, dim=0).to(dtype)
        grads = torch.autograd.grad((out * local_dout).sum(), local)
        real = layout.token_index(rank) < T  # padding rows have no reference
        err = (out[real].double() - layout.shard(ref.detach(), rank, dim=0)[real]).abs().max()
        for g, rg in zip(grads, ref_grads):
            err = max(err, (g[real].double() - layout.shard(rg, rank, dim=0)[real]).abs().max())
        errors[name] = float(err.detach())
    return errors


def _check_cases_and_subrings(rank, world):
    errors = _check_cases(rank, world)
    if world == 4:  # two independent rings of 2 inside the world, as the topology builds them
        rings = [dist.new_group([0, 1]), dist.new_group([2, 3])]
        ring = rings[rank // 2]
        sub = _check_cases(rank % 2, 2, ring)
        errors.update({f"subring_{name}": err for name, err in sub.items()})
        layout = RingLayout((0, 5, 11), 2, balanced=True)
        x = torch.arange(11.0) + 100 * (rank // 2)  # each ring gathers its own row
        got = gather_from_ring(layout.shard(x, rank % 2), layout, ring)
        errors["subring_gather"] = float((got - x).abs().max())
    return errors


@pytest.mark.parametrize("world", [2, 4])
def test_ring_attention_matches_full_attention(world):
    per_rank = run_local_ring(_check_cases_and_subrings, world, timeout_s=120)
    dtypes = {name: dtype for name, *_, dtype in CASES}
    dtypes.update({f"subring_{name}": dtype for name, dtype in dtypes.items()})
    dtypes["subring_gather"] = torch.float64
    if world == 4:
        assert len(per_rank[0]) == 2 * len(CASES) + 1
    for rank, errors in enumerate(per_rank):
        for name, err in errors.items():
            assert err <= TOL[dtypes[name]], f"world={world} rank={rank} case={name}: max err {err}"
