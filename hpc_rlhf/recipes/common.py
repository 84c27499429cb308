"""Pieces the recipes share: the tokenizer, the value model, the chat format, and the strategy
config derived from the job config (one builder for every recipe, RL included). Causal LMs load
through hpc_rlhf.models.actor.load_causal_lm; the forwards on a TokenBatch are in
hpc_rlhf.engine.logprobs; the run-time parts (metrics log, checkpoints, export) are
hpc_rlhf.runtime.

Recipes (sft.py, rm.py, dpo.py, ...) are loops read top to bottom over these.
"""
from __future__ import annotations

import os

import torch

from hpc_rlhf.data import ChatFormat
from hpc_rlhf.models.actor import load_causal_lm


# ---- models -------------------------------------------------------------------------------
def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    from hpc_rlhf.models.resolve import resolve_model_path
    tok = AutoTokenizer.from_pretrained(resolve_model_path(path))
    if tok.pad_token_id is None:   # many chat models ship without one; padding is masked anyway
        tok.pad_token = tok.eos_token
    return tok


def load_value_model_for(cfg, path: str):
    """The reward model this recipe trains (models.heads: an HF *ForSequenceClassification,
    one value per token), LoRA-wrapped when model.lora_rank > 0."""
    from hpc_rlhf.models.actor import config_dtype
    from hpc_rlhf.models.heads import load_value_model
    from hpc_rlhf.models.lora import LoraSpec
    from hpc_rlhf.models.resolve import attn_implementation, resolve_model_path
    m = cfg.model
    return load_value_model(resolve_model_path(path), dtype=config_dtype(m), lora=LoraSpec.of(m),
                            attn_implementation=attn_implementation(m.attn_implementation),
                            trust_remote_code=m.trust_remote_code)


def chat_format(tokenizer, data_cfg, chat_template: str | None = None) -> ChatFormat:
    """The config's chat format: `data.chat_template` overrides the tokenizer's template."""
    return ChatFormat(tokenizer, data_cfg.apply_chat_template,
                      chat_template or data_cfg.chat_template or None,
                      data_cfg.input_template or None)


# ---- strategy -----------------------------------------------------------------------------
def grad_accum(train_cfg, dp_size: int) -> int:
    per_step = train_cfg.micro_batch_size * dp_size
    if train_cfg.batch_size % per_step:
        raise ValueError(f"train.batch_size={train_cfg.batch_size} must be a multiple of "
                         f"train.micro_batch_size={train_cfg.micro_batch_size} x data-parallel "
                         f"size {dp_size} = {per_step}")
    return train_cfg.batch_size // per_step


def strategy_config(cfg, *, grad_accum: int, total_steps: int | None = None,
                    cpu_bf16: bool = False, **overrides):
    """StrategyConfig from a JobConfig (train.* and model.*): the one builder of every recipe.
    total_steps: the run's optimizer steps (default train.num_steps; the RL recipe and the
    round-based ones step the optimizer several times per step); the learning-rate warm-up is
    train.lr_warmup_ratio of them. bf16 follows model.dtype on CUDA (DeepSpeed's bf16: bf16
    weights, fp32 master weights); on a machine without it only where cpu_bf16 (the RL recipe;
    the supervised ones train fp32 there), as fp32 weights with bf16 matmuls (autocast_bf16)."""
    from hpc_rlhf.engine.deepspeed_strategy import StrategyConfig
    t = cfg.train
    total = total_steps or t.num_steps
    kw = dict(zero_stage=t.zero_stage,
              bf16=cfg.model.dtype == "bfloat16" and torch.cuda.is_available(),
              autocast_bf16=(cfg.model.dtype == "bfloat16" and cpu_bf16
                             and not torch.cuda.is_available()),
              micro_batch_size=t.micro_batch_size, grad_accum=grad_accum,
              max_grad_norm=t.max_grad_norm, lr=t.actor_lr, betas=(t.adam_beta1, t.adam_beta2),
              weight_decay=t.weight_decay, warmup_steps=int(t.lr_warmup_ratio * total),
              scheduler=t.lr_scheduler, total_steps=total,
              offload_optimizer=t.offload_optimizer, offload_params=t.offload_params,
              ref_offload=t.ref_offload, autotp_size=t.autotp_size,
              gradient_checkpointing=cfg.model.gradient_checkpointing, seed=t.seed)
    kw.update(overrides)
    return StrategyConfig(**kw)


def make_strategy(cfg, *, ring: bool = False, total_steps: int | None = None):
    """A DeepSpeedStrategy on the already-initialised default world (or a world of one).

    ring=True: the recipe implements train.ring_attn_size (engine/ring_common.py), so the
    data-parallel size behind grad_accum is world / (autotp x ring). Recipes that do not
    refuse ring_attn_size > 1 here instead of silently training without it.
    """
    import torch.distributed as dist

    from hpc_rlhf.engine.deepspeed_strategy import DeepSpeedStrategy
    t = cfg.train
    if t.ring_attn_size > 1 and not ring:
        from hpc_rlhf.config.rules import RING_TRAINERS
        raise ValueError(f"train.ring_attn_size={t.ring_attn_size} is implemented for train."
                         f"trainer in {list(RING_TRAINERS)}, not {t.trainer!r}; set "
                         "train.ring_attn_size=1")
    # not initialised yet: setup_distributed below joins the torchrun world (WORLD_SIZE)
    world = dist.get_world_size() if dist.is_initialized() else int(os.environ.get("WORLD_SIZE", 1))
    per_replica = t.autotp_size * (t.ring_attn_size if ring else 1)
    if world % per_replica:
        raise ValueError(f"train.autotp_size={t.autotp_size} x train.ring_attn_size="
                         f"{t.ring_attn_size} = {per_replica} must divide the {world} training "
                         "ranks; change one of them or the number of ranks")
    dp_size = world // per_replica
    strategy = DeepSpeedStrategy(strategy_config(cfg, grad_accum=grad_accum(t, dp_size),
                                                 total_steps=total_steps))
    strategy.setup_distributed(timeout_s=cfg.topology.timeout_s)
    return strategy


# ---- data and models --------------------------------------------------------------------
def setup_dataset_recipe(cfg, sample_fn, name: str, *, ring: bool = False, **keys):
    """(strategy, tokenizer, train samples, held-out samples or None) of a recipe on a fixed
    dataset: the strategy on the joined world (ring: see make_strategy), the tokenizer, and
    `sample_fn(row, fmt=<the config's chat format>, input_key=data.input_key, **keys)` over
    data.prompts / data.eval_prompts (filter counts printed on rank 0)."""
    from functools import partial
    strategy = make_strategy(cfg, ring=ring)
    tokenizer = load_tokenizer(cfg.model.path)
    d = cfg.data
    make = partial(sample_fn, fmt=chat_format(tokenizer, d), input_key=d.input_key, **keys)
    samples, eval_samples, _ = load_train_eval(d, make, name=name, rank=strategy.rank)
    return strategy, tokenizer, samples, eval_samples


def load_train_eval(data_cfg, make, *, name: str, rank: int):
    """(train samples, held-out samples or None, stats) of a trainer's data, the train file's
    filter/skip counts printed once (rank 0)."""
    from hpc_rlhf.data import load_samples
    d = data_cfg
    samples, stats = load_samples(d.prompts, make, max_len=d.max_len,
                                  skip_bad_rows=d.skip_bad_rows, limit=d.max_samples or None,
                                  probs=d.prompts_probs, seed=d.seed)
    eval_samples = (load_samples(d.eval_prompts, make, max_len=d.max_len,
                                 skip_bad_rows=d.skip_bad_rows)[0] if d.eval_prompts else None)
    if rank == 0:
        print(f"{name} data {d.prompts}: {stats.summary()}", flush=True)
    return samples, eval_samples, stats


def policy_and_reference(cfg, strategy, ring=None):
    """(trained policy engine, frozen reference engine) from model.path / model.ref_path; with
    a `ring` (ring_common.ring_setup) both use ring attention."""
    policy = strategy.prepare_model(load_causal_lm(cfg.model.path, cfg.model, trained=True))
    ref = strategy.prepare_eval_model(load_causal_lm(cfg.model.ref_path or cfg.model.path,
                                                     cfg.model))
    if ring is not None:
        from hpc_rlhf.engine.ring_common import enable_ring
        enable_ring(policy)
        enable_ring(ref)
    return policy, ref
