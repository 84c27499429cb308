"""Held-out reward: the training loop's evaluation (every `eval.every` steps) and the `eval`
program, which scores a model without training it:

    python -m hpc_rlhf.submit --config configs/grpo_tiny.yaml --local --program eval \
        model.path=runs/grpo_tiny/export launch.name=grpo_tiny_eval

model.path is any HF directory: a run's export/, or `submit export` of one of its
checkpoints. Same prompts (data.eval_prompts, else a held-out split of data.prompts;
eval.num_prompts of them), sampling (one sample each, eval.temperature) and reward as the
loop, so a run's `eval/reward` at step k equals the eval program's number for its step-k
weights. The program writes <run dir>/eval.json and prints one line.
"""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import torch
import torch.distributed as dist

from hpc_rlhf.config import JobConfig
from hpc_rlhf.recipes.rl.components import (build_engine, close_engine, local_prompts,
                                            rollout_sampling)
from hpc_rlhf.recipes.rl.prompts import config_prompts
from hpc_rlhf.rewards.base import reward_batch
from hpc_rlhf.topology import collectives


def held_out_prompts(cfg: JobConfig, tok) -> list:
    source = cfg.data.eval_prompts or cfg.data.prompts
    seed = cfg.data.seed + 7919 if not cfg.data.eval_prompts else cfg.data.seed
    return config_prompts(cfg.data, tok, source=source, num=cfg.eval.num_prompts,
                          seed=seed)[:cfg.eval.num_prompts]


def held_out_reward(cfg: JobConfig, engine, reward_source, tok, prompts, rank: int,
                    world: int) -> tuple[float, int]:
    """(mean reward over every rank's share, prompts scored); greedy (or eval.temperature),
    one sample each. Collective: every rank calls it."""
    usable = prompts[:len(prompts) - len(prompts) % world]
    engine_prompts, keep = local_prompts(usable, rank, world, cfg.rollout.tensor_parallel_size)
    mine = engine_prompts[keep]
    sampling = replace(rollout_sampling(cfg, seed=cfg.train.seed), n=1,
                       temperature=cfg.eval.temperature)
    rollouts = engine.generate([p.ids for p in engine_prompts], sampling)[keep]
    batch = reward_batch(tok, [p.ids for p in mine],  # n=1: rollouts[i] answers mine[i]
                         [r.response_ids for r in rollouts], [p.text for p in mine],
                         [p.label for p in mine])
    scores = reward_source.score(batch).double()
    total = collectives.all_reduce(torch.tensor([scores.sum().item(), len(mine)],
                                                dtype=torch.float64), "sum")
    return float(total[0] / max(total[1], 1)), int(total[1])


def run(cfg: JobConfig, topo, run_dir: Path) -> None:
    """The `eval` program (see the module doc)."""
    from transformers import AutoTokenizer

    from hpc_rlhf.models.resolve import resolve_model_path
    from hpc_rlhf.rewards.base import build_reward_source
    if cfg.topology.mode != "colocated":
        raise ValueError(f"the eval program runs colocated (every rank serves the model), but "
                         f"topology.mode={cfg.topology.mode!r}; add topology.mode=colocated")
    if cfg.reward.source == "agent":
        raise ValueError("the eval program scores single-turn rollouts; reward.source=agent "
                         "is evaluated by the training loop only")
    path = resolve_model_path(cfg.model.path)
    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=cfg.model.trust_remote_code)
    rank, world = dist.get_rank(), dist.get_world_size()
    engine = build_engine(cfg, path, tok)
    try:
        reward, n = held_out_reward(cfg, engine, build_reward_source(cfg), tok,
                                    held_out_prompts(cfg, tok), rank, world)
    finally:
        close_engine(engine)
    if rank == 0:
        result = {"model": cfg.model.path, "eval/reward": reward, "prompts": n,
                  "source": cfg.data.eval_prompts or cfg.data.prompts,
                  "temperature": cfg.eval.temperature}
        (run_dir / "eval.json").write_text(json.dumps(result, indent=1) + "\n")
        print(f"[eval] held-out reward {reward:.4f} on {n} prompts of {result['source']} "
              f"(model {cfg.model.path}); {run_dir / 'eval.json'}", flush=True)
