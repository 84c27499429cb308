"""KTO recipe: unpaired desirable / undesirable responses (data.label_key holds the flag).

    samples = load_samples(data.prompts, kto_sample)
    for step, micro-batch:
        r   = log pi(y|x) - log ref(y|x)                  (policy with grad, ref without)
        z0  = mean over ranks of the same on mismatched pairs (x_i, y_{i+1}), >= 0
        loss = kto_loss(r, desirable, z0)

train.ring_attn_size > 1 (ring_common.py): each micro-batch (and its mismatched-pair batch) is
packed into one row split over the ring; ring ranks read the same micro-batches; loss x ring.
"""
from __future__ import annotations

from functools import partial
from pathlib import Path

import torch

from hpc_rlhf.algos.losses_pref import kto_loss
from hpc_rlhf.data import kto_batch, kto_sample, prompt_response_batch
from hpc_rlhf.engine.ring_common import (Ring, batch_kwargs, data_coords, ring_setup, scaled,
                                         sequence_logps_any)
from hpc_rlhf.recipes.dpo import run_with_reference
from hpc_rlhf.runtime.loop import step_loop


def _logps(model, chunk, pad_id, packing, device, ring: Ring | None = None):
    batch, desirable = kto_batch(chunk, pad_id=pad_id, **batch_kwargs(packing, ring))
    return sequence_logps_any(model, batch.to(device), ring), desirable.to(device)


@torch.no_grad()
def kl_estimate(policy, ref, chunk, *, pad_id, packing, device, ring=None) -> torch.Tensor:
    """Mean log pi - log ref on mismatched pairs (prompt i, response i+1): a KL(pi||ref) proxy."""
    prompts = [s.prompt_ids for s in chunk]
    shifted = [chunk[(i + 1) % len(chunk)].response_ids for i in range(len(chunk))]
    batch = prompt_response_batch(prompts, shifted, pad_id=pad_id,
                                  **batch_kwargs(packing, ring)).to(device)
    return (sequence_logps_any(policy, batch, ring) - sequence_logps_any(ref, batch, ring)).mean()


@torch.no_grad()
def eval_kto(policy, ref, samples, *, pad_id, packing, device, micro_batch_size,
             ring=None) -> dict:
    """Mean implicit reward of desirable minus undesirable samples (all ranks evaluate all)."""
    rs, flags = [], []
    for i in range(0, len(samples), micro_batch_size):
        chunk = samples[i:i + micro_batch_size]
        pol, flag = _logps(policy, chunk, pad_id, packing, device, ring)
        rs.append(pol - _logps(ref, chunk, pad_id, packing, device, ring)[0])
        flags.append(flag)
    r, f = torch.cat(rs), torch.cat(flags)
    return {"reward_gap": (r[f].mean() - r[~f].mean()).item()}


def train_kto(policy, ref, strategy, samples, *, train_cfg, packing, pad_id, log,
              eval_samples=None, ring: Ring | None = None, ckpt=None) -> list[dict]:
    """The loop. `ring` (ring_common.ring_setup): sequence parallelism; both models must then
    use ring attention (ring_common.enable_ring)."""
    t = train_cfg
    common = dict(pad_id=pad_id, packing=packing, device=strategy.device, ring=ring)
    evaluate = partial(eval_kto, micro_batch_size=t.micro_batch_size, **common)

    def micro_step(micro: list[int]) -> dict:
        chunk = [samples[i] for i in micro]
        z0 = strategy.all_reduce_mean(kl_estimate(policy, ref, chunk, **common))
        with torch.no_grad():
            ref_logps, _ = _logps(ref, chunk, pad_id, packing, strategy.device, ring)
        pol_logps, desirable = _logps(policy, chunk, pad_id, packing, strategy.device, ring)
        loss = kto_loss(pol_logps, ref_logps, desirable, z0, beta=t.beta,
                        desirable_weight=t.kto_desirable_weight,
                        undesirable_weight=t.kto_undesirable_weight)
        strategy.backward(scaled(loss, ring), policy)
        strategy.step(policy)
        return {"loss": loss.item(), "kl": float(z0)}   # z0: already a mean over ranks

    return step_loop(model=policy, strategy=strategy, train_cfg=t, num_samples=len(samples),
                     micro_step=micro_step, log=log, ckpt=ckpt,
                     evaluate=(lambda: {f"eval_{k}": v for k, v in
                                        evaluate(policy, ref, eval_samples).items()})
                     if eval_samples else None, dp=data_coords(ring, strategy))


def run(cfg, topo, run_dir: Path) -> None:
    d = cfg.data
    run_with_reference(cfg, topo, run_dir, "kto", kto_sample, train_kto,
                       output_key=d.output_key, label_key=d.label_key)
