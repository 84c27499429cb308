"""vLLM sleep mode on CUDA (the colocated schedule's rollout side): level-1 sleep frees GPU
memory, waking the weights then the KV cache gives the same greedy outputs. Skipped, with the
reason printed, where vLLM is not installed (REQUIRE_GPU does not cover it)."""
import pytest
import torch

from gpulib import record

pytestmark = pytest.mark.gpu


def test_vllm_sleep_frees_memory_and_wakes_to_the_same_outputs():
    pytest.importorskip("vllm", reason="vllm is not installed: the vLLM sleep test needs it")
    from hpc_rlhf.models.cache import cache_dir
    from hpc_rlhf.models.tiny import ensure_tiny_model
    from hpc_rlhf.rollout.protocol import SamplingConfig
    from hpc_rlhf.rollout.vllm_engine import VLLMEngine
    engine = VLLMEngine(ensure_tiny_model(cache_dir() / "models"), enable_sleep=True,
                        gpu_memory_utilization=0.2, max_model_len=256, dtype="bfloat16")
    greedy = SamplingConfig(n=1, max_new_tokens=16, temperature=0.0)
    prompts = [[1, 10, 11, 12], [1, 20, 21]]
    before = [r.response_ids for r in engine.generate(prompts, greedy)]
    free0 = torch.cuda.mem_get_info()[0]
    engine.sleep()
    freed = torch.cuda.mem_get_info()[0] - free0
    engine.wake(("weights",))
    engine.wake(("kv_cache",))
    after = [r.response_ids for r in engine.generate(prompts, greedy)]
    assert freed > 0 and after == before, (freed, before, after)
    record("vLLM sleep level 1 / wake", "ok", f"freed {freed / 2**30:.2f} GiB, same outputs")
