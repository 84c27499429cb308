"""Building blocks of the RL recipe: strategy, models, rollout engine, prompt sharding, sampling,
weight sync and export. Each is small; loop.py reads as the recipe that uses them."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from hpc_rlhf.config import JobConfig, Sizes
from hpc_rlhf.models.actor import load_causal_lm
from hpc_rlhf.models.resolve import attn_implementation, resolve_model_path
from hpc_rlhf.rollout.protocol import SamplingConfig

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class Models:
    actor: object                 # DeepSpeed engine (policy)
    ref: object | None            # frozen reference engine (when a KL term is used)
    critic: object | None         # DeepSpeed engine of the value model (PPO)
    tokenizer: object
    model_path: str               # resolved HF directory of the policy
    pad_id: int


def build_strategy(cfg: JobConfig, s: Sizes, lr: float | None = None):
    """The actor's (or, with lr=train.critic_lr, the critic's) strategy: bf16 follows
    model.dtype on CPU too; the run's optimizer steps are optimizer_steps_per_step x
    train.num_steps."""
    from hpc_rlhf.engine.deepspeed_strategy import DeepSpeedStrategy
    from hpc_rlhf.recipes.common import strategy_config
    return DeepSpeedStrategy(strategy_config(
        cfg, grad_accum=s.grad_accum, total_steps=s.optimizer_steps_per_step * cfg.train.num_steps,
        cpu_bf16=True, lr=lr or cfg.train.actor_lr))


def uses_reference(cfg: JobConfig) -> bool:
    return cfg.algorithm.kl_coef > 0 or cfg.algorithm.kl_target > 0


def build_models(cfg: JobConfig, strategy) -> Models:
    from transformers import AutoTokenizer
    path = resolve_model_path(cfg.model.path)
    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=cfg.model.trust_remote_code)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    # fp32 weights: DeepSpeed casts to bf16 where model.dtype asks for it
    policy = load_causal_lm(path, cfg.model, trained=True, dtype=torch.float32)
    actor = strategy.prepare_model(policy)
    ref = None
    if uses_reference(cfg):
        ref_path = resolve_model_path(cfg.model.ref_path or cfg.model.path)
        ref = strategy.prepare_eval_model(load_causal_lm(ref_path, cfg.model,
                                                         dtype=torch.float32))
    critic = None
    if cfg.algorithm.name == "ppo":
        from hpc_rlhf.models.heads import load_value_model
        critic_path = resolve_model_path(cfg.model.critic_path or cfg.model.path)
        critic_strategy = build_strategy(cfg, _sizes_of(cfg), lr=cfg.train.critic_lr)
        critic = critic_strategy.prepare_model(load_value_model(
            critic_path, lora=_lora_spec(cfg),
            attn_implementation=attn_implementation(cfg.model.attn_implementation)))
    return Models(actor, ref, critic, tok, path, pad_id)


def _lora_spec(cfg: JobConfig):
    """model.lora_* as a LoraSpec (actor and critic alike), or None without LoRA."""
    from hpc_rlhf.models.lora import LoraSpec
    return LoraSpec.of(cfg.model)


def _sizes_of(cfg):
    from hpc_rlhf.config import sizes
    return sizes(cfg)


AGENT_FEEDBACK_TOKENS = 64  # budget per environment turn when rollout.max_model_len=0


def default_max_model_len(cfg: JobConfig) -> int:
    """Prompt + response budget; multi-turn agents add every turn and its feedback."""
    r = cfg.rollout
    if cfg.reward.source == "agent":
        turns = cfg.reward.max_turns
        return cfg.data.max_prompt_len + turns * (r.max_new_tokens + AGENT_FEEDBACK_TOKENS)
    return cfg.data.max_prompt_len + r.max_new_tokens


def build_engine(cfg: JobConfig, model_path: str, tokenizer):
    """This rank's rollout engine (or its TP slice of one); HF serves a plain model replica
    that weight syncs overwrite, like vLLM's copy."""
    r = cfg.rollout
    if r.engine == "hf":
        from hpc_rlhf.rollout.hf_engine import HFEngine
        replica = load_causal_lm(model_path, cfg.model, dtype=torch.float32)
        replica = replica.eval().requires_grad_(False)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        return HFEngine(replica, eos_token_ids=[tokenizer.eos_token_id], pad_token_id=pad,
                        tokenizer=tokenizer)
    from hpc_rlhf.rollout.vllm_engine import VLLMEngine
    max_len = r.max_model_len or default_max_model_len(cfg)
    backend = "external_launcher" if torch.distributed.is_initialized() else None
    return VLLMEngine(model_path, tensor_parallel_size=r.tensor_parallel_size,
                      dtype=cfg.model.dtype, max_model_len=max_len, seed=cfg.train.seed,
                      gpu_memory_utilization=r.gpu_memory_utilization,
                      enable_sleep=r.enable_sleep, distributed_executor_backend=backend)


def close_engine(engine) -> None:
    """Shut a vLLM engine down while the process groups it used still exist (its own
    at-exit cleanup would run after the topology destroyed them, and fail)."""
    llm = getattr(engine, "llm", None)
    if llm is not None:
        llm.llm_engine.engine_core.shutdown()


def local_prompts(step_prompts: list, rank: int, world: int, tp: int) -> tuple[list, slice]:
    """(prompts this rank's engine generates, the slice of them this rank trains on).

    Ranks of one TP group share an engine, which must receive identical requests (vLLM's
    external_launcher): they all generate their engine's share, then each keeps its own
    contiguous part of the groups for training. With tp == 1 both are the rank's share.
    """
    from hpc_rlhf.recipes.rl.prompts import shard
    engine_prompts = shard(step_prompts, rank // tp, world // tp)
    per = len(engine_prompts) // tp
    if per * tp != len(engine_prompts):
        raise ValueError(f"{len(engine_prompts)} prompts per engine cannot be split over its "
                         f"{tp} tensor-parallel ranks")
    part = rank % tp
    return engine_prompts, slice(part * per, (part + 1) * per)


def rollout_sampling(cfg: JobConfig, seed: int) -> SamplingConfig:
    r = cfg.rollout
    return SamplingConfig(n=r.n_samples_per_prompt, max_new_tokens=r.max_new_tokens,
                          temperature=r.temperature, top_p=r.top_p, top_k=r.top_k,
                          stop=tuple(r.stop), seed=seed)


def policy_weights(strategy, actor, alloc=None):
    """(HF name, full tensor) of the policy as a rollout engine loads it (LoRA merged).
    alloc: a weight-sync sender's `alloc` (gathered weights land in its buckets); not used
    with LoRA, whose merge keeps every gathered tensor until the end."""
    from hpc_rlhf.weight_sync.tied import with_tied_outputs
    module = getattr(actor, "module", actor)
    if hasattr(module, "peft_config"):  # engines serve W + BA merged, under base names
        from hpc_rlhf.checkpoint.export import hf_state
        named = iter(hf_state(actor, strategy.gathered_state(actor)).items())
    else:
        named = strategy.gathered_state(actor, alloc=alloc, dtype=strategy.sync_dtype)
    return with_tied_outputs(named, actor)


def sync_weights(strategy, actor, engine) -> None:
    """Colocated weight sync, in-process: gather ZeRO-3 shards, load them in the engine."""
    engine.wake(("weights",))
    engine.load_weights(policy_weights(strategy, actor))
    engine.wake(("kv_cache",))


def stream_state(prompts, kl_ctl) -> dict:
    """What an RL checkpoint saves besides the engines: the prompt stream's position and the
    KL coefficient (adaptive controllers move it)."""
    return {"prompts": prompts.state_dict(), "kl_coef": kl_ctl.value}


def restore_stream_state(extra: dict, prompts, kl_ctl) -> None:
    """Put back what stream_state saved (a resumed or branched run)."""
    prompts.load_state_dict(extra["prompts"])
    kl_ctl.value = extra["kl_coef"]
