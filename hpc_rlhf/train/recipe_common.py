"""Pieces every supervised / preference recipe shares: model + tokenizer loading, the strategy
config derived from the job config, forwards that return per-token / per-sample logprobs on a
TokenBatch, metric logging and the final HF export.

Recipes (sft.py, rm.py, dpo.py, ...) are loops read top to bottom over these.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch

from hpc_rlhf.data import ChatFormat, TokenBatch, segment_sum, token_logprobs
from hpc_rlhf.topology import collectives


# ---- models -------------------------------------------------------------------------------
def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    from hpc_rlhf.models.resolve import resolve_model_path
    tok = AutoTokenizer.from_pretrained(resolve_model_path(path))
    if tok.pad_token_id is None:   # many chat models ship without one; padding is masked anyway
        tok.pad_token = tok.eos_token
    return tok


def load_causal_lm(path: str, model_cfg):
    """An HF causal LM from a config path ('tiny:llama', 'embedded:...', a directory)."""
    from transformers import AutoModelForCausalLM

    from hpc_rlhf.models.resolve import attn_implementation, resolve_model_path
    dtype = getattr(torch, model_cfg.dtype)
    if dtype == torch.bfloat16 and not torch.cuda.is_available():
        dtype = torch.float32  # CPU: the supervised trainers run fp32 (the RL recipe honours bf16)
    return AutoModelForCausalLM.from_pretrained(
        resolve_model_path(path), dtype=dtype,
        attn_implementation=attn_implementation(model_cfg.attn_implementation),
        trust_remote_code=model_cfg.trust_remote_code)


def chat_format(tokenizer, data_cfg, chat_template: str | None = None) -> ChatFormat:
    """The config's chat format: `data.chat_template` overrides the tokenizer's template."""
    return ChatFormat(tokenizer, data_cfg.apply_chat_template,
                      chat_template or data_cfg.chat_template or None)


# ---- strategy -----------------------------------------------------------------------------
def grad_accum(train_cfg, dp_size: int) -> int:
    per_step = train_cfg.micro_batch_size * dp_size
    if train_cfg.batch_size % per_step:
        raise ValueError(f"train.batch_size={train_cfg.batch_size} must be a multiple of "
                         f"train.micro_batch_size={train_cfg.micro_batch_size} x data-parallel "
                         f"size {dp_size} = {per_step}")
    return train_cfg.batch_size // per_step


def strategy_config(cfg, dp_size: int, **overrides):
    """StrategyConfig from a JobConfig (train.* and model.*)."""
    from hpc_rlhf.train.deepspeed_strategy import StrategyConfig
    t = cfg.train
    kw = dict(zero_stage=t.zero_stage,
              bf16=cfg.model.dtype == "bfloat16" and torch.cuda.is_available(),
              micro_batch_size=t.micro_batch_size, grad_accum=grad_accum(t, dp_size),
              max_grad_norm=t.max_grad_norm, lr=t.actor_lr, betas=(t.adam_beta1, t.adam_beta2),
              weight_decay=t.weight_decay, warmup_steps=int(t.lr_warmup_ratio * t.num_steps),
              scheduler=t.lr_scheduler, total_steps=t.num_steps,
              offload_optimizer=t.offload_optimizer, offload_params=t.offload_params,
              ref_offload=t.ref_offload, autotp_size=t.autotp_size,
              gradient_checkpointing=cfg.model.gradient_checkpointing, seed=t.seed)
    kw.update(overrides)
    return StrategyConfig(**kw)


def make_strategy(cfg, *, ring: bool = False, **overrides):
    """A DeepSpeedStrategy on the already-initialised default world (or a world of one).

    ring=True: the recipe implements train.ring_attn_size (train/ring_common.py), so the
    data-parallel size behind grad_accum is world / (autotp x ring). Recipes that do not
    refuse ring_attn_size > 1 here instead of silently training without it.
    """
    import torch.distributed as dist

    from hpc_rlhf.train.deepspeed_strategy import DeepSpeedStrategy
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
    strategy = DeepSpeedStrategy(strategy_config(cfg, dp_size, **overrides))
    strategy.setup_distributed(timeout_s=cfg.topology.timeout_s)
    return strategy


# ---- forwards -----------------------------------------------------------------------------
def forward_logits(model, batch: TokenBatch) -> torch.Tensor:
    out = model(**batch.model_inputs())
    return out.logits if hasattr(out, "logits") else out[0]      # [b, T, v]


def forward_token_logprobs(model, batch: TokenBatch) -> torch.Tensor:
    """[b, T] float32 log p(token | its sample's prefix); mask with batch.loss_mask."""
    return token_logprobs(forward_logits(model, batch), batch)


def sequence_logps(model, batch: TokenBatch) -> torch.Tensor:
    """Sum of target-token logprobs of each sample: [num_samples] float32."""
    lp = forward_token_logprobs(model, batch)
    return segment_sum(lp * batch.loss_mask, batch.segment_ids, batch.num_samples)


# ---- bookkeeping --------------------------------------------------------------------------
class MetricLog:
    """Rank 0 appends one JSON line per step to run_dir/metrics.jsonl and prints it."""

    def __init__(self, run_dir: Path | None, rank: int, log_every: int = 1):
        self.rank, self.log_every, self.t0 = rank, log_every, time.time()
        self.path = Path(run_dir) / "metrics.jsonl" if run_dir is not None else None
        self.history: list[dict] = []
        if self.path is not None and rank == 0:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def __call__(self, step: int, metrics: dict) -> None:
        rec = {"step": step, "time_s": round(time.time() - self.t0, 3),
               **{k: float(v) for k, v in metrics.items()}}
        self.history.append(rec)
        if self.rank != 0:
            return
        if self.path is not None:
            with self.path.open("a") as f:
                f.write(json.dumps(rec) + "\n")
        if step % self.log_every == 0:
            print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                           for k, v in rec.items()), flush=True)


def export_hf(strategy, engine, tokenizer, out_dir: Path) -> None:
    """Gather the (ZeRO-3) weights and write an HF directory on rank 0 (collective)."""
    state = dict(strategy.gathered_state(engine))
    if strategy.rank == 0:
        module = getattr(engine, "module", engine)
        out_dir.mkdir(parents=True, exist_ok=True)
        module.save_pretrained(out_dir, state_dict=state)
        tokenizer.save_pretrained(out_dir)


def load_train_eval(data_cfg, make, *, name: str, rank: int):
    """(train samples, held-out samples or None, stats) of a trainer's data, the train file's
    filter/skip counts printed once (rank 0)."""
    from hpc_rlhf.data import load_samples
    d = data_cfg
    samples, stats = load_samples(d.prompts, make, max_len=d.max_len,
                                  skip_bad_rows=d.skip_bad_rows)
    eval_samples = (load_samples(d.eval_prompts, make, max_len=d.max_len,
                                 skip_bad_rows=d.skip_bad_rows)[0] if d.eval_prompts else None)
    if rank == 0:
        print(f"{name} data {d.prompts}: {stats.summary()}", flush=True)
    return samples, eval_samples, stats


def policy_and_reference(cfg, strategy, ring=None):
    """(trained policy engine, frozen reference engine) from model.path / model.ref_path; with
    a `ring` (ring_common.ring_setup) both use ring attention."""
    policy = strategy.prepare_model(load_causal_lm(cfg.model.path, cfg.model))
    ref = strategy.prepare_eval_model(load_causal_lm(cfg.model.ref_path or cfg.model.path,
                                                     cfg.model))
    if ring is not None:
        from hpc_rlhf.train.ring_common import enable_ring
        enable_ring(policy)
        enable_ring(ref)
    return policy, ref


# ---- checkpoints and preemption ---------------------------------------------------------------
class StepCheckpoints:
    """Resume and save for a supervised trainer's step loop, with the stop-vote protocol of
    rl/loop.py (hpc_rlhf.launch.signals): the loop's batches must be a pure function of the
    step (data.step_indices), so the step counter, the engines and the RNG are the whole state.

        ckpt = StepCheckpoints(cfg, strategy, {"model": engine}, run_dir)
        for step in range(ckpt.resume(), cfg.train.num_steps):
            ...train step...
            if ckpt.after_step(step + 1):   # saved on a signal and not done: stop (requeue)
                return

    A loop with more state (a prompt stream's cursor, ...) passes it as
    `after_step(step + 1, extra_state={...})` and reads it back from `ckpt.extra` after
    `resume()` (an empty dict when nothing was restored).
    """

    def __init__(self, cfg, strategy, engines: dict, run_dir: Path | None):
        self.c, self.num_steps, self.strategy, self.engines = (cfg.checkpoint,
                                                               cfg.train.num_steps, strategy,
                                                               engines)
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.dir = self.run_dir / "checkpoints" if self.run_dir is not None else None
        self.stopped = False  # True once the loop stopped early on a signal
        self.extra: dict = {}  # the caller's extra_state of the restored checkpoint

    def resume(self) -> int:
        """The step to start from: that of the newest complete checkpoint, else 0."""
        if self.dir is None or not self.c.resume:
            return 0
        restored = self.strategy.load_checkpoint(self.dir, self.engines)
        if restored is None:
            return 0
        self.extra = dict(restored[1] or {})
        if self.strategy.rank == 0:
            print(f"[train] resumed from step {restored[0]} ({self.dir})", flush=True)
        return restored[0]

    def after_step(self, done_steps: int, extra_state: dict | None = None) -> bool:
        """Collective. Save (with `extra_state`) on schedule, at the end, or when any rank got
        a signal; True when the loop must stop now (a signal before the last step)."""
        from hpc_rlhf.launch.signals import agreed_stop_vote, request_requeue
        vote = agreed_stop_vote()  # 0 go on, 1 SIGTERM only, 2 warned (requeue)
        done = done_steps == self.num_steps
        every = self.c.save_every
        if self.dir is None or not (vote or done or (every and done_steps % every == 0)):
            return False
        self.strategy.save_checkpoint(self.dir, done_steps, self.engines, extra_state,
                                      keep_last=self.c.keep_last)
        if not vote or done:
            return False
        if self.strategy.rank == 0:
            requeue = request_requeue(self.run_dir)
            print(f"[train] checkpointed at step {done_steps} on a signal; "
                  + ("requeue requested" if requeue else "no requeue (SIGTERM, not a preemption)"),
                  flush=True)
        collectives.barrier()
        self.stopped = True
        return True
