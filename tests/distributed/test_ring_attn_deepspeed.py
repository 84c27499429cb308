"""Ring attention under DeepSpeed ZeRO-3: 2 gloo ranks form one ring (ring_attn_size=2, no
extra data parallelism); 5 AdamW steps of the tiny Llama match one plain process (ring size 1).
DeepSpeed averages gradients over all its ranks, so the loss is multiplied by the ring size
(ring ranks' partial gradients must be summed). Tolerance: relative loss difference 1e-5."""
import os

import pytest
import torch

from hpc_rlhf.ring_attn import RingAttnConfig, enable_ring_attention, ring_token_logprobs, run_local_ring

from distlib import (
    CU_SEQLENS,
    RING_LR as LR,
    RING_STEPS as STEPS,
    packed_batch,
    reference_loss,
    tiny_llama,
)

pytestmark = [pytest.mark.distributed, pytest.mark.deepspeed]


def _zero3_worker(rank, world):
    # DeepSpeed reads these and checks them against the (already initialised) gloo group
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    import deepspeed

    input_ids, labels = packed_batch()
    model = enable_ring_attention(tiny_llama(torch.float32))
    engine, *_ = deepspeed.initialize(
        model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=LR),
        config={"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3},
                "zero_allow_untested_optimizer": True, "gradient_clipping": 0.0},
    )
    cfg = RingAttnConfig(size=world)
    trajectory = []
    for _ in range(STEPS):
        logp = ring_token_logprobs(engine, input_ids[None], labels[None], CU_SEQLENS, None, cfg)
        loss = -logp.sum() / (labels != -100).sum()
        engine.backward(loss * cfg.size)
        engine.step()
        trajectory.append(loss.item())
    return trajectory


def test_ring_size_2_under_zero3_matches_ring_size_1():
    per_rank = run_local_ring(_zero3_worker, 2, timeout_s=300)
    input_ids, labels = packed_batch()
    model = tiny_llama(torch.float32)
    opt = torch.optim.AdamW(model.parameters(), lr=LR)
    reference = []
    for _ in range(STEPS):
        opt.zero_grad()
        loss = reference_loss(model, input_ids, labels)
        loss.backward()
        opt.step()
        reference.append(loss.item())
    for rank, trajectory in enumerate(per_rank):
        for step, (got, want) in enumerate(zip(trajectory, reference)):
            assert abs(got - want) <= 1e-5 * abs(want), f"rank {rank} step {step}: {got} vs {want}"
