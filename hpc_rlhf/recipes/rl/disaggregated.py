"""The RL recipe with separate rollout ranks (topology.mode=disaggregated).

Ranks [0, T) train (actor, optionally critic/reward worlds), ranks [T, N) host E vLLM engines
of TP size P. Every rank reads the same prompt stream, so prompts never travel: engine e
generates share e of the step's prompts. Per step:

    rollout ranks: generate -> all-gather trajectories over the job group
    trainer ranks: all-gather -> keep their data-parallel share -> score -> experience -> train
    weight sync:   actor world gathers ZeRO-3 shards; its rank 0 broadcasts buckets over the
                   sync group (actor rank 0 + all rollout ranks); engines load them

Async mode (rollout.async_steps=1): engines generate step k+1 with the weights of step k-1
while the trainers train step k (staleness 1, reported as rollout/staleness); the trainers
correct the mismatch with TIS/ICEPOP (algorithm.off_policy, required by the config).
    all ranks:     agree on "stop" (preemption signal) over the job group

The critic shares the actor ranks here (topology.critic_ranks=0); separate critic and reward
worlds are laid out by the topology but not driven by this recipe yet (config refuses them).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from hpc_rlhf.algos.kl import make_kl_controller
from hpc_rlhf.config import JobConfig, sizes
from hpc_rlhf.engine.ring_rl import setup_rl_ring
from hpc_rlhf.faults import fault_point
from hpc_rlhf.metrics.logger import Timer
from hpc_rlhf.recipes.rl.collect import collect, load_agent
from hpc_rlhf.recipes.rl.components import (build_models, build_strategy, close_engine,
                                            policy_weights, restore_stream_state,
                                            rollout_sampling, stream_state)
from hpc_rlhf.recipes.rl.experience import make_batch
from hpc_rlhf.recipes.rl.prompts import PromptStream, prompt_stream, shard
from hpc_rlhf.recipes.rl.step import make_experience, sample_records, score_rollouts, train_on_batch
from hpc_rlhf.runtime import RunContext
from hpc_rlhf.runtime.signals import agreed_stop_vote
from hpc_rlhf.topology import collectives
from hpc_rlhf.weight_sync import BroadcastReceiver, BroadcastSender


def run(cfg: JobConfig, topo, run_dir: Path) -> None:
    if cfg.topology.critic_ranks or cfg.topology.reward_ranks:
        raise NotImplementedError("separate critic/reward ranks are not driven by the RL recipe "
                                  "yet; set topology.critic_ranks=0 and topology.reward_ranks=0")
    s = sizes(cfg)
    step_prompts_source = _prompts(cfg)
    job, sync = topo.job_group, topo.sync_group
    bucket = cfg.rollout.weight_sync_bucket_mb * 2**20
    if topo.is_rollout:
        _serve(cfg, topo, step_prompts_source, job, sync)
    else:
        _train(cfg, s, topo, step_prompts_source, job, sync, run_dir, bucket)


def _prompts(cfg: JobConfig):
    from transformers import AutoTokenizer
    from hpc_rlhf.models.resolve import resolve_model_path
    tok = AutoTokenizer.from_pretrained(resolve_model_path(cfg.model.path))
    return prompt_stream(cfg, tok)


def _sampling(cfg: JobConfig, step: int, engine: int):
    return rollout_sampling(cfg, seed=cfg.train.seed * 1_000_003 + step * 10_007 + engine * 101)


# ---- rollout ranks --------------------------------------------------------------------------
def _serve(cfg: JobConfig, topo, prompts: PromptStream, job, sync) -> None:
    from transformers import AutoTokenizer
    from hpc_rlhf.models.resolve import resolve_model_path
    from hpc_rlhf.recipes.rl.components import build_engine
    path = resolve_model_path(cfg.model.path)
    tok = AutoTokenizer.from_pretrained(path)
    engine = build_engine(cfg, path, tok)
    engine.tokenizer_for_agents = tok
    e, num_engines = topo.engine_index, topo.layout.num_engines
    receiver = BroadcastReceiver(sync, 0)
    agent = load_agent(cfg)
    tok = engine.tokenizer_for_agents
    asynchronous = cfg.rollout.async_steps > 0

    def generate(step: int, version: int):
        mine = shard(prompts.next_step(), e, num_engines)
        t0 = time.perf_counter()
        fault_point("rollout")
        episodes = collect(cfg, engine, tok, mine, _sampling(cfg, step, e), agent, version)
        return (e, time.perf_counter() - t0, episodes) if topo.engine_tp_rank == 0 else None

    try:
        start = _receive_start(job)
        if start:  # resumed trainers send their weights first
            receiver.load_into(engine)
        prompts.cursor = start * prompts.per_step
        version = start  # optimizer steps behind the weights the engine holds
        pending = generate(start, version)
        for step in range(start, cfg.train.num_steps):
            collectives.gather_objects(pending, job)      # step's episodes -> trainers
            last = step + 1 == cfg.train.num_steps
            if asynchronous and not last:         # overlaps the trainers' step: 1 step stale
                pending = generate(step + 1, version)
            receiver.load_into(engine)            # weights after step
            version = step + 1
            if agreed_stop_vote(job):  # MAX over the job group; stop_agreed has run
                return
            if not asynchronous and not last:
                pending = generate(step + 1, version)
    finally:
        close_engine(engine)


def _receive_start(job) -> int:
    """The step the trainers start from (0, or the resumed checkpoint's step)."""
    return collectives.reduce_values([0], "sum", job, torch.long)[0]  # trainers send it


# ---- trainer ranks --------------------------------------------------------------------------
@dataclass
class _Trainer:
    """What every step of an actor rank uses (built once by `_train`)."""
    cfg: object
    s: object              # config.Sizes
    strategy: object
    models: object
    reward_source: object  # None with an agent
    kl_ctl: object
    sender: object         # BroadcastSender on the actor world's rank 0, else None
    job: object            # the group of every rank of the job (engines included)
    prompts: PromptStream
    engines: dict          # what a checkpoint saves: actor (+ critic)
    rank0: bool
    timer: Timer = field(default_factory=Timer)


def _train(cfg, s, topo, prompts: PromptStream, job, sync, run_dir: Path, bucket: int) -> None:
    strategy = build_strategy(cfg, s)
    strategy.setup_distributed(timeout_s=cfg.topology.timeout_s)
    setup_rl_ring(cfg, topo)  # train.ring_attn_size > 1: the topology's ring groups
    models = build_models(cfg, strategy)
    from hpc_rlhf.rewards.base import build_reward_source
    a, rank0 = cfg.algorithm, topo.rank == 0
    engines = {"actor": models.actor} | ({"critic": models.critic} if models.critic else {})
    t = _Trainer(cfg, s, strategy, models,
                 None if cfg.reward.source == "agent" else build_reward_source(cfg),
                 make_kl_controller(a.kl_coef, a.kl_target or None, a.kl_horizon),
                 # Buckets live where the sync group's backend needs them (CUDA for NCCL).
                 BroadcastSender(sync, 0, bucket_bytes=bucket,
                                 verify=cfg.rollout.weight_sync_verify) if sync is not None
                 else None, job, prompts, engines, rank0)
    # The RunContext of every recipe; the stop vote spans the job group (engines included).
    ctx = RunContext(cfg, strategy, run_dir, name="rl")
    ckpt = ctx.checkpoints(engines, vote_group=job)
    start = ckpt.resume()
    if start:
        restore_stream_state(ckpt.extra, prompts, t.kl_ctl)
    collectives.reduce_values([start if rank0 else 0], "sum", job, torch.long)
    if start:
        _send_weights(strategy, models, t.sender)
    for step in range(start, cfg.train.num_steps):
        metrics, records = _trainer_step(t, step)
        ctx.log.samples(step, records)
        ctx.log(step, metrics)
        if ckpt.after_step(step + 1, stream_state(prompts, t.kl_ctl)):
            break
    ctx.finish(models.actor, models.tokenizer, ckpt)  # export (actor ranks), summary


def _my_rollouts(t: _Trainer, step: int) -> tuple:
    """(this rank's prompts, their rollouts, generation seconds, staleness in steps): the
    engines' rollouts of this step, gathered over the job group, this rank's share kept."""
    n, dp_rank, dp = t.cfg.rollout.n_samples_per_prompt, t.strategy.dp_rank, t.strategy.dp_size
    step_prompts = t.prompts.next_step()
    with t.timer("rollout"):  # trainers wait here while the engines generate
        gathered = [x for x in collectives.gather_objects(None, t.job) if x is not None]
    gathered.sort(key=lambda x: x[0])
    rollouts = [r for _, _, rs in gathered for r in rs]  # prompt-major over all engines
    mine = shard(step_prompts, dp_rank, dp)
    per = len(mine) * n
    local = rollouts[dp_rank * per:(dp_rank + 1) * per]
    for k, r in enumerate(local):  # prompt_index relative to this rank's prompts
        r.prompt_index = k // n
    return (mine, local, max(x[1] for x in gathered),
            step - min(r.version for r in rollouts))


def _trainer_step(t: _Trainer, step: int) -> tuple[dict, list]:
    """Rewards, experience, train and weight sync of one step; (metrics averaged over the
    actor ranks, sample records on rank 0)."""
    cfg, models, timer = t.cfg, t.models, t.timer
    t0 = time.perf_counter()
    mine, local, gen_time, staleness = _my_rollouts(t, step)
    with timer("reward"):
        rewards, _, reward_logs = score_rollouts(cfg, t.reward_source, models.tokenizer,
                                                 mine, local)
    records = (sample_records(models.tokenizer, mine, local, rewards,
                              cfg.logging.samples_per_step)
               if t.rank0 and cfg.logging.samples_per_step else [])
    batch = make_batch([r.prompt_ids for r in local], [r.response_ids for r in local],
                       [r.logprobs for r in local], rewards, models.pad_id,
                       action_masks=None if t.reward_source is not None else
                       [r.action_mask for r in local])
    with timer("experience"):
        batch, exp_metrics = make_experience(cfg, t.s, models, batch, t.kl_ctl.value)
    with timer("train"):
        fault_point("train")
        train_metrics = train_on_batch(cfg, t.s, t.strategy, models, batch, t.kl_ctl.value, step)
        train_metrics["train/zero_stage"] = t.strategy.zero_stage
    with timer("weight_sync"):
        fault_point("weight_sync")
        sync_stats = _send_weights(t.strategy, models, t.sender)
    if "kl/mean" in exp_metrics:
        t.kl_ctl.update(exp_metrics["kl/mean"], t.s.samples_per_step)
    lengths = batch.action_mask.sum(1).float()
    metrics = {**exp_metrics, **train_metrics, **timer.pop(), "kl/coef": t.kl_ctl.value,
               "reward/mean": rewards.mean().item(), "rollout/response_len": lengths.mean().item(),
               "rollout/generate_s": gen_time, "rollout/staleness": float(staleness),
               "time/step": time.perf_counter() - t0,
               **collectives.mean_present_metrics(reward_logs)}
    if sync_stats is not None:
        metrics.update(sync_stats.as_metrics())
    keys = sorted(k for k in metrics if not k.startswith("weight_sync/"))
    metrics.update(collectives.mean_metrics({k: metrics[k] for k in keys}))
    return metrics, records


def _send_weights(strategy, models, sender):
    """Collective over the actor world; its rank 0 broadcasts buckets to the engines."""
    weights = policy_weights(strategy, models.actor,
                             alloc=sender.alloc if sender is not None else None)
    if sender is None:  # other actor ranks: take part in the ZeRO-3 gathers only
        for _ in weights:
            pass
        return None
    return sender.send(weights)
