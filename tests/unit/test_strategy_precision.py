"""Which precision each recipe trains in, from model.dtype and the machine."""
import pytest
import torch

from hpc_rlhf.config import load_config
from hpc_rlhf.engine.deepspeed_strategy import StrategyConfig, compute_precision
from hpc_rlhf.recipes.common import strategy_config

pytestmark = pytest.mark.unit


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU mapping")
def test_cpu_bf16_is_fp32_weights_with_bf16_matmuls_for_rl_only():
    cfg = load_config("configs/grpo_tiny.yaml", ["model.dtype=bfloat16"])
    rl = strategy_config(cfg, grad_accum=1, cpu_bf16=True)
    assert rl.autocast_bf16 and not rl.bf16
    supervised = strategy_config(cfg, grad_accum=1)
    assert not supervised.autocast_bf16 and not supervised.bf16  # fp32 on a CPU
    fp32 = strategy_config(load_config("configs/grpo_tiny.yaml", ["model.dtype=float32"]),
                           grad_accum=1, cpu_bf16=True)
    assert not fp32.autocast_bf16 and not fp32.bf16


def test_bf16_and_autocast_together_are_refused():
    with pytest.raises(ValueError, match="bf16=True and autocast_bf16=True: choose one"):
        StrategyConfig(bf16=True, autocast_bf16=True)


def test_compute_precision_follows_the_engine_mark():
    lin = torch.nn.Linear(8, 8)
    x = torch.randn(2, 8)
    lin.hpc_autocast = torch.bfloat16
    with compute_precision(lin):
        assert lin(x).dtype == torch.bfloat16
    lin.hpc_autocast = None
    with compute_precision(lin):
        assert lin(x).dtype == torch.float32
    with compute_precision(torch.nn.Linear(8, 8)):  # an unmarked module: as it is
        assert lin(x).dtype == torch.float32
