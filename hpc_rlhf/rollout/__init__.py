"""Rollout engines: the protocol, a vLLM engine (default) and an HF-generate fallback.

    from hpc_rlhf.rollout import SamplingConfig, VLLMEngine
    engine = VLLMEngine("path/to/hf_model", dtype="float32", max_model_len=512)
    rollouts = engine.generate([[1, 5, 40]], SamplingConfig(n=4, max_new_tokens=32))

Importing this package does not import vllm (only constructing a `VLLMEngine` does).
"""
from hpc_rlhf.rollout.hf_engine import HFEngine
from hpc_rlhf.rollout.protocol import (Rollout, RolloutEngine, SamplingConfig, check_prompts,
                                       logprob_gap)
from hpc_rlhf.rollout.vllm_engine import VLLMEngine

__all__ = ["HFEngine", "Rollout", "RolloutEngine", "SamplingConfig", "VLLMEngine",
           "check_prompts", "logprob_gap"]
