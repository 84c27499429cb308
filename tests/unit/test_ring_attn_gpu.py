"""Ring attention on CUDA: the torch kernel, and ring-flash-attn (skipped with the logged
reason when it is not installed or does not import with this transformers)."""
import pytest
import torch

from hpc_rlhf.ring_attn import RingLayout, ring_attention, select_backend

pytestmark = pytest.mark.gpu

CU = (0, 100, 130, 256)


def _naive(q, k, v):
    T, H, D = q.shape
    k, v = (t.repeat_interleave(H // t.shape[1], 1) for t in (k, v))
    seg = torch.bucketize(torch.arange(T, device=q.device), torch.tensor(CU[1:], device=q.device), right=True)
    allowed = (seg[:, None] == seg[None, :]) & torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
    s = torch.einsum("qhd,khd->hqk", q, k) / D ** 0.5
    return torch.einsum("hqk,khd->qhd", s.masked_fill(~allowed, float("-inf")).softmax(-1), v)


def _qkv(dtype):
    torch.manual_seed(0)
    return [torch.randn(CU[-1], h, 64, device="cuda", dtype=dtype) for h in (8, 2, 2)]


def test_torch_ring_kernel_on_cuda_matches_naive():
    q, k, v = _qkv(torch.float32)
    out = ring_attention(q, k, v, RingLayout(CU, 1))
    assert (out - _naive(q, k, v)).abs().max() < 1e-4


def test_flash_backend_matches_naive_on_one_rank():
    choice = select_backend("auto", "cuda", RingLayout(CU, 1))
    if choice.name != "flash":
        pytest.skip(f"ring-flash-attn not usable: {choice.reason}")
    import torch.distributed as dist

    from hpc_rlhf.ring_attn.backend import flash_ring_attention

    # One rank: an in-process store, no port at all.
    dist.init_process_group("nccl", store=dist.HashStore(), rank=0, world_size=1)
    try:
        q, k, v = _qkv(torch.bfloat16)
        out = flash_ring_attention(q, k, v, RingLayout(CU, 1), None)
        assert (out.float() - _naive(q.float(), k.float(), v.float())).abs().max() < 3e-2
    finally:
        dist.destroy_process_group()
