"""The colocated memory schedule's order (hpc_rlhf.engine.memory_schedule) through one RL step
with an evaluation and a checkpoint, on the real HF engine and a real torch model's optimizer states."""
import pytest
import torch

from hpc_rlhf.engine.memory_schedule import ColocatedMemory
from hpc_rlhf.rollout.hf_engine import HFEngine

pytestmark = pytest.mark.unit


class _Trainer:
    """The attributes of a DeepSpeed engine that memory.offload reads, on a real module."""

    def __init__(self):
        self.module = torch.nn.Linear(64, 64)
        self.optimizer = torch.optim.Adam(self.module.parameters())
        self.module(torch.ones(1, 64)).sum().backward()
        self.optimizer.step()  # Adam states exist now


def test_schedule_order_and_accounting():
    from hpc_rlhf.models.cache import cache_dir
    from hpc_rlhf.models.tiny import ensure_tiny_model
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(ensure_tiny_model(cache_dir() / "models"))
    engine = HFEngine(model, eos_token_ids=[2], pad_token_id=0)
    trainer = _Trainer()
    mem = ColocatedMemory(engine, [trainer], enabled=True)
    weights = dict(model.state_dict())
    mem.to_rollout()                                   # step: rollout
    mem.to_train()                                     # experience + train
    mem.sync(iter(weights.items()))                    # weight sync
    mem.to_rollout()                                   # evaluation
    mem.to_train()                                     # checkpoint
    mem.to_rollout()                                   # next step
    assert mem.log == ["offload", "sleep", "reload", "wake:weights", "load",
                       "offload", "wake:kv_cache", "sleep", "reload", "offload", "wake:all"]
    states = 64 * 64 + 64                              # params; Adam: exp_avg + exp_avg_sq
    assert mem.offloaded_gib * 1024 ** 3 == 3 * states * 4
    m = mem.metrics()
    assert {"memory/rollout_peak_gib", "memory/train_peak_gib", "memory/sync_peak_gib"} <= set(m)
    assert m["memory/offload_drop_gib"] == 0.0 and all(v >= 0 for v in m.values())


def test_disabled_schedule_keeps_deepspeed_resident():
    from hpc_rlhf.models.cache import cache_dir
    from hpc_rlhf.models.tiny import ensure_tiny_model
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(ensure_tiny_model(cache_dir() / "models"))
    mem = ColocatedMemory(HFEngine(model, eos_token_ids=[2], pad_token_id=0), [_Trainer()],
                          enabled=False)
    mem.to_rollout()
    mem.to_train()
    mem.sync(iter(model.state_dict().items()))
    mem.to_rollout()
    assert mem.log == ["sleep", "wake:weights", "load", "wake:kv_cache"]
    assert mem.offloaded_gib == 0.0
