"""bf16 on a CPU: fp32 weights with bf16 matmuls (StrategyConfig.autocast_bf16), and why.

DeepSpeed's bf16 keeps fp32 master weights but computes with their round-to-nearest bf16 copy.
With weights of SmolLM2's size (median |w| ~0.1) half a bf16 ulp exceeds one Adam step at an RL
learning rate, so most weights the forward sees do not move at all: the case below measures
it. autocast_bf16 trains the fp32 weights themselves and runs the matmuls in bf16.
"""
import json

import pytest
import torch

from testlib import scaled, spawn

pytestmark = [pytest.mark.distributed, pytest.mark.deepspeed]

LR = 5e-5


def _step_worker(rank, world, port, model_path, out_path):
    import os
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")
    torch.set_num_threads(1)
    from transformers import AutoModelForCausalLM

    from hpc_rlhf.engine.deepspeed_strategy import (DeepSpeedStrategy, StrategyConfig,
                                                    compute_precision)
    x = torch.randint(7, 100, (2, 24), generator=torch.Generator().manual_seed(0))
    out = {}
    for mode in ("bf16", "autocast_bf16"):
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():  # SmolLM2-like magnitudes: |w| in [0.06, 0.14]
            for p in model.parameters():
                p.copy_(torch.sign(torch.randn(p.shape, generator=g))
                        * (0.06 + 0.08 * torch.rand(p.shape, generator=g)))
        if mode == "bf16":
            model = model.to(torch.bfloat16)
        strat = DeepSpeedStrategy(StrategyConfig(zero_stage=0, lr=LR, total_steps=4,
                                                 **{mode: True}))
        strat.setup_distributed()
        engine = strat.prepare_model(model)
        seen = {n: p.detach().float().clone() for n, p in engine.module.named_parameters()}
        with compute_precision(engine):
            res = engine(input_ids=x, labels=x)
        strat.backward(res.loss, engine)
        strat.step(engine)
        moved = sum(((p.detach().float() - seen[n]).abs() > LR / 2).sum().item()
                    for n, p in engine.module.named_parameters())
        total = sum(p.numel() for p in engine.module.parameters())
        weights = {p.dtype for p in engine.module.parameters()}
        out[mode] = {"logits": str(res.logits.dtype), "moved": moved / total,
                     "weights": sorted(str(d) for d in weights),
                     "loss_finite": bool(torch.isfinite(res.loss).item())}
    with open(out_path, "w") as f:
        json.dump(out, f)


@pytest.fixture(scope="module")
def first_step(tmp_path_factory):
    from hpc_rlhf.models.tiny import ensure_tiny_model
    path = ensure_tiny_model(tmp_path_factory.mktemp("models"))
    out = tmp_path_factory.mktemp("bf16") / "out.json"
    spawn(_step_worker, 1, (str(path), str(out)), 180)
    return json.loads(out.read_text())


@pytest.mark.timeout(scaled(300))
def test_autocast_bf16_moves_every_weight_by_the_first_adam_step(first_step):
    ac = first_step["autocast_bf16"]
    assert ac["weights"] == ["torch.float32"] and ac["logits"] == "torch.bfloat16"
    # Adam's first step moves every weight with a gradient by lr (unused embedding rows have none)
    assert ac["loss_finite"] and ac["moved"] > 0.9, ac


@pytest.mark.timeout(scaled(300))
def test_bf16_weights_mostly_cannot_move_by_one_rl_step(first_step):
    """The trap autocast_bf16 avoids (measured: SmolLM2-135M has 92% of its weights so)."""
    bf = first_step["bf16"]
    assert bf["weights"] == ["torch.bfloat16"] and bf["moved"] < 0.1, bf  # measured: 0.0
