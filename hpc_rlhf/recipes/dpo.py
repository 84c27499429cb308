"""Direct preference optimisation recipe (DPO / IPO / cDPO via train.preference_loss).

    pairs  = load_samples(data.prompts, pair_sample)
    policy = strategy.prepare_model(model); ref = strategy.prepare_eval_model(same weights)
    for step, micro-batch:  chosen + rejected in one (optionally packed) batch
        logps = sum of response-token logprobs (policy, ref)
        loss  = preference_loss(...); backward; step
    margin = beta * [(pi - ref)(chosen) - (pi - ref)(rejected)]

train.ring_attn_size > 1 (ring_common.py): each micro-batch (chosen + rejected) is packed into
one row split over the ring; ring ranks read the same micro-batches; loss x ring in backward.
"""
from __future__ import annotations

from functools import partial
from pathlib import Path

import torch

from hpc_rlhf.algos.losses_pref import preference_loss
from hpc_rlhf.data import pair_batch, pair_sample
from hpc_rlhf.engine.moe import attach_router_aux_loss
from hpc_rlhf.engine.ring_common import (Ring, batch_kwargs, data_coords, ring_setup, scaled,
                                         sequence_logps_any)
from hpc_rlhf.recipes.common import policy_and_reference, setup_dataset_recipe
from hpc_rlhf.runtime import RunContext, StepLog
from hpc_rlhf.runtime.loop import step_loop


def pair_logps(model, samples, *, pad_id: int, packing: bool, device, ring: Ring | None = None):
    """(chosen logps [n], rejected logps [n]) from one forward over both."""
    n = len(samples)
    batch = pair_batch(samples, pad_id=pad_id, **batch_kwargs(packing, ring)).to(device)
    logps = sequence_logps_any(model, batch, ring)
    return logps[:n], logps[n:]


@torch.no_grad()
def eval_pairs(policy, ref, samples, *, beta: float, pad_id: int, packing: bool, device,
               micro_batch_size: int, ring: Ring | None = None) -> dict:
    """Reward margin / accuracy and the policy's own logp margin (all ranks evaluate all)."""
    margins, logp_margins = [], []
    for i in range(0, len(samples), micro_batch_size):
        chunk = samples[i:i + micro_batch_size]
        pc, pr = pair_logps(policy, chunk, pad_id=pad_id, packing=packing, device=device,
                            ring=ring)
        rc, rr = pair_logps(ref, chunk, pad_id=pad_id, packing=packing, device=device, ring=ring)
        margins.append(beta * ((pc - rc) - (pr - rr)))
        logp_margins.append(pc - pr)
    m = torch.cat(margins)
    return {"reward_margin": m.mean().item(), "reward_accuracy": (m > 0).float().mean().item(),
            "logp_margin": torch.cat(logp_margins).mean().item()}


def train_dpo(policy, ref, strategy, samples, *, train_cfg, packing: bool, pad_id: int,
              log: StepLog, eval_samples=None, ring: Ring | None = None, ckpt=None) -> list[dict]:
    """The loop. `ring` (ring_common.ring_setup): sequence parallelism; both models must then
    use ring attention (ring_common.enable_ring)."""
    t = train_cfg
    if t.preference_loss == "cdpo" and t.label_smoothing == 0:
        raise ValueError("train.preference_loss='cdpo' with train.label_smoothing=0 is plain DPO;"
                         " set train.label_smoothing (e.g. 0.1) or train.preference_loss=dpo")
    common = dict(pad_id=pad_id, packing=packing, device=strategy.device, ring=ring)
    evaluate = partial(eval_pairs, beta=t.beta, micro_batch_size=t.micro_batch_size, **common)
    aux = attach_router_aux_loss(policy, getattr(t, "aux_loss_coef", 0.0))  # MoE policy only

    def micro_step(micro: list[int]) -> dict:
        chunk = [samples[i] for i in micro]
        with torch.no_grad():
            ref_c, ref_r = pair_logps(ref, chunk, **common)
        pol_c, pol_r = pair_logps(policy, chunk, **common)
        loss, rew_c, rew_r = preference_loss(pol_c, pol_r, ref_c, ref_r, beta=t.beta,
                                             loss_type=t.preference_loss,
                                             label_smoothing=t.label_smoothing)
        # + train.aux_loss_coef x MoE load-balancing loss of the policy forward (0 = off)
        strategy.backward(scaled(aux.add_to(loss), ring), policy)
        strategy.step(policy)
        return {"loss": loss.item(), "reward_margin": (rew_c - rew_r).mean().item(),
                "reward_accuracy": (rew_c > rew_r).float().mean().item()}

    return step_loop(model=policy, strategy=strategy, train_cfg=t, num_samples=len(samples),
                     micro_step=micro_step, log=log, ckpt=ckpt,
                     evaluate=(lambda: {f"eval_{k}": v for k, v in
                                        evaluate(policy, ref, eval_samples).items()})
                     if eval_samples else None, dp=data_coords(ring, strategy))


def run_with_reference(cfg, topo, run_dir: Path, name: str, sample_fn, train_fn, **keys):
    """run() of the recipes that train a policy against its frozen reference (DPO, KTO):
    `sample_fn` reads the rows (with the data keys `keys`), `train_fn` is the loop."""
    strategy, tokenizer, samples, eval_samples = setup_dataset_recipe(
        cfg, sample_fn, name, ring=True, **keys)
    ring = ring_setup(cfg.train, topo)         # None unless train.ring_attn_size > 1
    policy, ref = policy_and_reference(cfg, strategy, ring)
    ctx = RunContext(cfg, strategy, run_dir, name=name)
    ckpt = ctx.checkpoints({"model": policy})
    train_fn(policy, ref, strategy, samples, train_cfg=cfg.train, packing=cfg.data.packing,
             pad_id=tokenizer.pad_token_id, log=ctx.log, eval_samples=eval_samples, ring=ring,
             ckpt=ckpt)
    ctx.finish(policy, tokenizer)


def run(cfg, topo, run_dir: Path) -> None:
    d = cfg.data
    run_with_reference(cfg, topo, run_dir, "dpo", pair_sample, train_dpo,
                       chosen_key=d.chosen_key, rejected_key=d.rejected_key)
