"""The RL speed-ups that are on by default are exact: one RL step with the defaults
(train.shared_prompt=auto and train.max_tokens_per_micro_batch=-1 resolve to shared-prompt
forwards and a token budget, config/rules.py) gives the same experience, losses and optimizer-step
gradient as the plain path (one padded row per sample, fixed micro-batches), both with
algorithm.token_mean_scope=step (the default).

Two gloo ranks, real DeepSpeed ZeRO-3, the tiny Llama as actor and frozen reference (GRPO with a
k3 KL loss and an entropy bonus, so the reference's shared forward, the fused logprob path and
the entropy-with-gradient path all run). Each rank holds its own synthetic groups: rank 0 short
responses, rank 1 long ones, so the ranks' budgets cut different numbers of micro-batches before
equalising the count. The gradient at the step's boundary is read from DeepSpeed before the
optimizer consumes it. fp32: only the summation order differs.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
N, GROUPS = 4, 2  # samples per prompt, prompt groups per rank
CHECKED = ("model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight",
           "model.layers.1.mlp.down_proj.weight", "lm_head.weight")

pytestmark = [pytest.mark.distributed, pytest.mark.deepspeed]


def _cfg(*extra: str):
    from hpc_rlhf.config import load_config
    return load_config(ROOT / "configs" / "grpo_tiny.yaml", [
        "topology.procs_per_node=2", "rollout.engine=hf", f"rollout.prompts_per_step={2 * GROUPS}",
        f"rollout.n_samples_per_prompt={N}", f"train.batch_size={2 * GROUPS * N}",
        "train.micro_batch_size=4", "algorithm.kl_coef=0.05", "algorithm.entropy_coef=0.01",
        *extra])


def _groups(rank: int):
    """GROUPS prompts x N samples: identical prompts within a group, random responses."""
    from hpc_rlhf.recipes.rl.experience import make_batch
    g = torch.Generator().manual_seed(7 + rank)
    longest = 4 if rank == 0 else 8
    prompts, responses = [], []
    for _ in range(GROUPS):
        prompt = torch.randint(3, 120, (int(torch.randint(5, 20, (1,), generator=g)),),
                               generator=g).tolist()
        for _ in range(N):
            prompts.append(prompt)
            responses.append(torch.randint(3, 120, (int(torch.randint(1, longest + 1, (1,),
                                                                      generator=g)),),
                                           generator=g).tolist())
    logps = [-torch.rand(len(r), generator=g) * 3 for r in responses]
    return make_batch(prompts, responses, logps, torch.randn(len(prompts), generator=g), pad_id=0)


def _step(cfg) -> dict:
    from deepspeed.utils import safe_get_full_grad

    from hpc_rlhf.config import sizes
    from hpc_rlhf.recipes.rl.components import build_models, build_strategy
    from hpc_rlhf.recipes.rl.step import make_experience, train_on_batch
    s = sizes(cfg)
    strategy = build_strategy(cfg, s)
    strategy.setup_distributed(timeout_s=120)
    models = build_models(cfg, strategy)
    grads = {}
    step = strategy.step

    def step_and_keep_grads(engine):
        if engine is models.actor and engine.is_gradient_accumulation_boundary():
            named = dict(engine.module.named_parameters())
            grads.update({n: safe_get_full_grad(named[n]).clone() for n in CHECKED})
        step(engine)

    strategy.step = step_and_keep_grads
    rank = int(os.environ["RANK"])
    batch, _ = make_experience(cfg, s, models, _groups(rank), cfg.algorithm.kl_coef)
    metrics = train_on_batch(cfg, s, strategy, models, batch, cfg.algorithm.kl_coef, 0)
    mask = batch.action_mask.bool()
    return {"sizes": (s.shared_prompt, s.micro_tokens, s.micro_response_tokens),
            "ref": batch.ref_logp[mask], "adv": batch.advantages[mask], "metrics": metrics,
            "grads": grads}


def _worker(rank, world, cache):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      LOCAL_WORLD_SIZE=str(world), HPC_RLHF_CACHE=cache)
    plain = _step(_cfg("train.shared_prompt=false", "train.max_tokens_per_micro_batch=0"))
    fast = _step(_cfg())
    return plain, fast


def test_default_shared_prompt_and_token_budget_equal_the_plain_step(tmp_path):
    from hpc_rlhf.models.tiny import ensure_tiny_model
    from hpc_rlhf.ring_attn import run_local_ring
    ensure_tiny_model(tmp_path / "cache" / "models", arch="llama")
    results = run_local_ring(_worker, 2, (str(tmp_path / "cache"),), timeout_s=240)
    for rank, (plain, fast) in enumerate(results):
        assert plain["sizes"] == (False, 0, 0)
        assert fast["sizes"] == (True, 4 * (64 + 8), 4 * 8), fast["sizes"]  # the auto values
        torch.testing.assert_close(fast["ref"], plain["ref"], rtol=0, atol=1e-5)
        torch.testing.assert_close(fast["adv"], plain["adv"], rtol=0, atol=1e-6)
        # fewer or as many forwards: packed groups under the budget (the count is equalised)
        assert fast["metrics"]["train/micro_batches"] <= plain["metrics"]["train/micro_batches"]
    plain, fast = results[0]   # ZeRO-3 gathers the same full gradient on every rank
    for n in CHECKED:
        ref = plain["grads"][n]
        assert ref.abs().max() > 1e-4, n                       # the check is not vacuous
        torch.testing.assert_close(fast["grads"][n], ref, rtol=1e-4, atol=1e-6, msg=n)
