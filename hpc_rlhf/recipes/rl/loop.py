"""The RL recipe (PPO, REINFORCE++, REINFORCE++-baseline, GRPO, Dr.GRPO, RLOO), colocated:
every rank trains (DeepSpeed) and hosts a rollout engine slice (vLLM or HF), time-sharing memory.

One step, top to bottom:
    prompts -> rollout (n samples each) -> rewards -> experience (old/ref logprobs, values, KL,
    advantages) -> train (PPO-clip policy loss [+ KL loss, entropy], critic) -> weight sync
    -> metrics -> checkpoint (on schedule or on a preemption signal, then requeue), through
    the RunContext every recipe uses (log, checkpoints and stop vote, export, summary)
Disaggregated layouts run `hpc_rlhf.recipes.rl.disaggregated` instead (separate rollout ranks).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from hpc_rlhf.algos.kl import make_kl_controller
from hpc_rlhf.config import JobConfig, sizes
from hpc_rlhf.engine.memory_schedule import ColocatedMemory
from hpc_rlhf.engine.ring_rl import setup_rl_ring
from hpc_rlhf.faults import fault_point
from hpc_rlhf.metrics.logger import Timer
from hpc_rlhf.recipes.rl.collect import collect, load_agent, varied_groups
from hpc_rlhf.recipes.rl.components import (build_engine, build_models, build_strategy,
                                            close_engine, local_prompts, policy_weights,
                                            restore_stream_state, rollout_sampling, stream_state)
from hpc_rlhf.recipes.rl.evaluate import held_out_prompts, held_out_reward
from hpc_rlhf.recipes.rl.experience import Batch, make_batch
from hpc_rlhf.recipes.rl.prompts import prompt_stream
from hpc_rlhf.recipes.rl.step import sample_records, make_experience, score_rollouts, train_on_batch
from hpc_rlhf.runtime import RunContext
from hpc_rlhf.runtime.profile import profile_phase
from hpc_rlhf.topology import collectives


def run(cfg: JobConfig, topo, run_dir: Path) -> None:
    if cfg.topology.mode != "colocated":
        from hpc_rlhf.recipes.rl.disaggregated import run as run_disaggregated
        return run_disaggregated(cfg, topo, run_dir)
    s = sizes(cfg)
    strategy = build_strategy(cfg, s)
    strategy.setup_distributed(timeout_s=cfg.topology.timeout_s)
    setup_rl_ring(cfg, topo)  # train.ring_attn_size > 1: the topology's ring groups
    rank, world = dist.get_rank(), dist.get_world_size()
    models = build_models(cfg, strategy)            # actor, ref, critic, tokenizer, model_path
    engine = build_engine(cfg, models.model_path, models.tokenizer)
    try:
        _train(cfg, s, strategy, models, engine, rank, world, run_dir)
    finally:
        close_engine(engine)


@dataclass
class _Run:
    """What every step of the colocated loop uses (built once by `_train`)."""
    cfg: JobConfig
    s: object              # config.Sizes
    strategy: object
    models: object
    engine: object
    mem: ColocatedMemory
    prompts: object        # the prompt stream (its position is checkpointed)
    reward_source: object  # None with an agent
    agent: object
    kl_ctl: object
    eval_prompts: list
    engines: dict          # what a checkpoint saves: actor (+ critic)
    rank: int
    world: int
    run_dir: Path
    timer: Timer = field(default_factory=Timer)

    def evaluate(self) -> float:
        self.mem.to_rollout()
        return _evaluate(self.cfg, self.engine, self.reward_source, self.models.tokenizer,
                         self.eval_prompts, self.rank, self.world)


def _train(cfg, s, strategy, models, engine, rank, world, run_dir) -> None:
    from hpc_rlhf.rewards.base import build_reward_source
    agent = load_agent(cfg)
    a, tok = cfg.algorithm, models.tokenizer
    engines = {"actor": models.actor} | ({"critic": models.critic} if models.critic else {})
    # vLLM and DeepSpeed take turns on the GPU (engine/memory_schedule.py); bookkeeping on a CPU.
    run = _Run(cfg, s, strategy, models, engine,
               ColocatedMemory(engine, engines.values(), enabled=cfg.rollout.enable_sleep),
               prompt_stream(cfg, tok), None if agent is not None else build_reward_source(cfg),
               agent, make_kl_controller(a.kl_coef, a.kl_target or None, a.kl_horizon),
               _eval_prompts(cfg, tok), engines, rank, world, run_dir)
    ctx = RunContext(cfg, strategy, run_dir, name="rl")
    ckpt = ctx.checkpoints(engines)
    start = ckpt.resume()
    if start:
        restore_stream_state(ckpt.extra, run.prompts, run.kl_ctl)
        run.mem.sync(policy_weights(strategy, models.actor))  # the engine has step-0 weights
    if cfg.eval.every and start == 0 and run.reward_source is not None:  # the baseline
        ctx.log(-1, {"eval/reward": run.evaluate()})
    for step in range(start, cfg.train.num_steps):
        metrics, records = _step(run, step)
        ctx.log.samples(step, records)
        ctx.log(step, metrics)
        # DeepSpeed's states resident for a save (before_save)
        if ckpt.after_step(step + 1, stream_state(run.prompts, run.kl_ctl),
                           before_save=run.mem.to_train):
            break
    if not ckpt.stopped and cfg.checkpoint.export_hf:
        run.mem.to_train()
    ctx.finish(models.actor, tok, ckpt)   # export/ unless stopped, the summary


def _step(run: _Run, step: int) -> tuple[dict, list]:
    """One RL step: rollout and rewards, experience, train, weight sync; (metrics averaged
    over the ranks, rank 0's sample records)."""
    cfg, models, mem, timer = run.cfg, run.models, run.mem, run.timer
    t0 = time.perf_counter()
    mem.to_rollout()
    # 1-2. Rollout (n samples per prompt, or agent episodes) and rewards; with dynamic
    # filtering, groups whose rewards are all equal are replaced by fresh prompts.
    episodes, rewards, collect_metrics, records = _collect_step(
        cfg, run.engine, models.tokenizer, run.prompts, run.reward_source, run.agent, run.rank,
        run.world, step, timer)
    batch = make_batch([e.prompt_ids for e in episodes], [e.response_ids for e in episodes],
                       [e.logprobs for e in episodes], rewards, models.pad_id,
                       action_masks=None if run.agent is None else
                       [e.action_mask for e in episodes])
    # 3. Experience: the engine sleeps while the trainer holds the memory.
    mem.to_train()
    with timer("experience"), profile_phase("experience", step, run.run_dir, run.rank):
        batch, exp_metrics = make_experience(cfg, run.s, models, batch, run.kl_ctl.value)
    # 4. Train.
    with timer("train"), profile_phase("train", step, run.run_dir, run.rank):
        fault_point("train")
        train_metrics = train_on_batch(cfg, run.s, run.strategy, models, batch,
                                       run.kl_ctl.value, step)
    # 5. Weight sync: wake vLLM's weights, load the new ones (KV cache wakes at rollout).
    with timer("weight_sync"):
        fault_point("weight_sync")
        mem.sync(policy_weights(run.strategy, models.actor))
    if "kl/mean" in exp_metrics:
        run.kl_ctl.update(exp_metrics["kl/mean"], run.s.samples_per_step)
    metrics = {**exp_metrics, **train_metrics, **_rollout_metrics(batch, episodes),
               **collect_metrics, "kl/coef": run.kl_ctl.value}
    if cfg.eval.every and (step + 1) % cfg.eval.every == 0 and run.reward_source is not None:
        with timer("eval"):
            metrics["eval/reward"] = run.evaluate()
    metrics.update(timer.pop())
    metrics.update(mem.metrics())
    metrics["train/zero_stage"] = run.strategy.zero_stage  # the stage that ran, not the asked
    metrics["time/step"] = time.perf_counter() - t0
    metrics["throughput/tokens_per_s"] = metrics["rollout/tokens"] / max(
        metrics["time/rollout"], 1e-9)
    return collectives.mean_metrics(metrics), records


MAX_FILTER_ROUNDS = 4  # dynamic filtering: generation rounds per step before giving up


def _collect_step(cfg, engine, tok, prompts, reward_source, agent, rank, world, step, timer):
    """This rank's episodes and rewards for one step (whole groups of n, prompt-major), the
    step's metrics and, on rank 0, logging.samples_per_step sample records (as scored)."""
    n = cfg.rollout.n_samples_per_prompt
    kept, spare, rounds, first_kept, records, reward_logs = [], [], 0, None, [], {}
    quota = cfg.rollout.prompts_per_step // world
    while True:
        with timer("rollout"):
            tp = cfg.rollout.tensor_parallel_size
            engine_prompts, keep = local_prompts(prompts.next_step(), rank, world, tp)
            sampling = rollout_sampling(cfg, seed=cfg.train.seed * 1_000_003 + step * 10_007
                                        + rounds * 1_009 + (rank // tp) * 101)
            fault_point("rollout")
            episodes = collect(cfg, engine, tok, engine_prompts, sampling, agent)
            mine = engine_prompts[keep]
            episodes = episodes[keep.start * n:keep.stop * n]
            for k, e in enumerate(episodes):  # index into `mine` from here on
                e.prompt_index = k // n
        with timer("reward"):
            rewards, scores, logs = score_rollouts(cfg, reward_source, tok, mine, episodes)
            reward_logs = reward_logs or logs  # the first round's batch, as the samples
        if rounds == 0 and rank == 0 and cfg.logging.samples_per_step:
            records = sample_records(tok, mine, episodes, rewards, cfg.logging.samples_per_step)
        groups = [(episodes[g * n:(g + 1) * n], rewards[g * n:(g + 1) * n])
                  for g in range(len(mine))]
        rounds += 1
        if not cfg.algorithm.dynamic_filtering:
            kept = groups
            break
        varied = varied_groups(scores, n, cfg.algorithm.dynamic_filtering_range)
        first_kept = first_kept if first_kept is not None else sum(varied) / len(varied)
        kept += [g for g, v in zip(groups, varied) if v]
        spare += [g for g, v in zip(groups, varied) if not v]
        # Every rank must train on the same number of groups: stop when all have enough.
        if _agree_all(len(kept) >= quota) or rounds >= MAX_FILTER_ROUNDS:
            kept = (kept + spare)[:quota]  # short of varied groups: flat ones add no gradient
            break
    episodes = [e for g, _ in kept for e in g]
    rewards = torch.cat([r for _, r in kept])
    metrics = collectives.mean_present_metrics(reward_logs)  # names may differ between ranks
    if cfg.algorithm.dynamic_filtering:
        metrics.update({"filter/kept_frac": first_kept, "filter/rounds": float(rounds)})
    return episodes, rewards, metrics, records


def _agree_all(flag: bool) -> bool:
    return collectives.all_flag(flag)


def _rollout_metrics(batch: Batch, rollouts) -> dict:
    lengths = batch.action_mask.sum(1).float()
    truncated = sum(r.finish_reason == "length" for r in rollouts)
    return {"reward/mean": batch.rewards.mean().item(), "reward/std": batch.rewards.std().item()
            if batch.size > 1 else 0.0, "rollout/response_len": lengths.mean().item(),
            "rollout/truncated_frac": truncated / max(len(rollouts), 1),
            "rollout/tokens": lengths.sum().item()}


def _eval_prompts(cfg: JobConfig, tok):
    return held_out_prompts(cfg, tok) if cfg.eval.every else []


def _evaluate(cfg, engine, reward_source, tok, eval_prompts, rank, world) -> float:
    return held_out_reward(cfg, engine, reward_source, tok, eval_prompts, rank, world)[0]



