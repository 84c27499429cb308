"""Reward-model recipe: Bradley-Terry loss on (chosen, rejected) pairs, optional margin.

    pairs  = load_samples(data.prompts, pair_sample)      # row[data.margin_key] optional
    engine = strategy.prepare_model(value model)          # models.heads: HF seq-cls + per-token
    for step, micro-batch:  score(prompt+chosen), score(prompt+rejected) at each last token
        loss = -log sigmoid(s_w - s_l - margin); backward; step
    held-out accuracy = P(s_w > s_l)

train.ring_attn_size > 1 (ring_common.py): each micro-batch (chosen + rejected) is packed into
one row split over the ring; per-token scores are gathered back; loss x ring in backward.

The export (run_dir/export) is a plain HF *ForSequenceClassification with num_labels=1 and
the tokenizer: what `reward.source=model model.reward_model_path=...`, transformers and vLLM
load. LoRA (model.lora_rank > 0) trains adapters + the score head; the export merges them.
"""
from __future__ import annotations

from functools import partial
from pathlib import Path

import torch

from hpc_rlhf.algos.losses_pref import bradley_terry_loss
from hpc_rlhf.data import (pair_batch, pair_sample,
                           segment_last_index)
from hpc_rlhf.engine.ring_common import (Ring, batch_kwargs, data_coords, enable_ring, ring_setup,
                                         ring_token_outputs, scaled)
from hpc_rlhf.recipes.common import load_value_model_for, setup_dataset_recipe
from hpc_rlhf.runtime import RunContext, StepLog
from hpc_rlhf.runtime.context import EXPORT_DIR
from hpc_rlhf.runtime.loop import step_loop


def pair_scores(model, samples, *, pad_id: int, packing: bool, device, ring: Ring | None = None):
    """(chosen scores [n], rejected scores [n]): the score at each sequence's last token."""
    n = len(samples)
    batch = pair_batch(samples, pad_id=pad_id, **batch_kwargs(packing, ring)).to(device)
    if ring is not None:  # one row split over the ring, scores gathered back: [1, T]
        values = ring_token_outputs(model, batch, ring, use_cache=False)
    else:
        values = model(**batch.model_inputs())                              # [b, T]
    last = segment_last_index(batch.segment_ids, 2 * n)                     # [2n]
    scores = values.reshape(-1)[last]
    return scores[:n], scores[n:]


@torch.no_grad()
def eval_pair_accuracy(model, samples, *, pad_id: int, packing: bool, device,
                       micro_batch_size: int, ring: Ring | None = None) -> dict:
    """Accuracy (s_w > s_l) and mean score gap over `samples` (all ranks evaluate all)."""
    wins, gaps = [], []
    for i in range(0, len(samples), micro_batch_size):
        c, r = pair_scores(model, samples[i:i + micro_batch_size], pad_id=pad_id,
                           packing=packing, device=device, ring=ring)
        wins.append((c > r).float())
        gaps.append(c - r)
    return {"accuracy": torch.cat(wins).mean().item(), "score_gap": torch.cat(gaps).mean().item()}


def train_rm(engine, strategy, samples, *, train_cfg, packing: bool, pad_id: int,
             log: StepLog, eval_samples=None, ring: Ring | None = None, ckpt=None) -> list[dict]:
    """The loop. `ring` (ring_common.ring_setup): sequence parallelism; the engine's backbone
    must then use ring attention (ring_common.enable_ring)."""
    evaluate = partial(eval_pair_accuracy, pad_id=pad_id, packing=packing,
                       device=strategy.device, micro_batch_size=train_cfg.micro_batch_size,
                       ring=ring)

    def micro_step(micro: list[int]) -> dict:
        chunk = [samples[i] for i in micro]
        chosen, rejected = pair_scores(engine, chunk, pad_id=pad_id, packing=packing,
                                       device=strategy.device, ring=ring)
        margin = torch.tensor([s.margin for s in chunk], device=chosen.device)
        loss = bradley_terry_loss(chosen, rejected, margin)
        strategy.backward(scaled(loss, ring), engine)
        strategy.step(engine)
        return {"loss": loss.item(), "accuracy": (chosen > rejected).float().mean().item()}

    return step_loop(model=engine, strategy=strategy, train_cfg=train_cfg,
                     num_samples=len(samples), micro_step=micro_step, log=log, ckpt=ckpt,
                     evaluate=(lambda: {f"eval_{k}": v for k, v in
                                        evaluate(engine, eval_samples).items()})
                     if eval_samples else None, dp=data_coords(ring, strategy))


def run(cfg, topo, run_dir: Path) -> None:
    d = cfg.data
    strategy, tokenizer, samples, eval_samples = setup_dataset_recipe(
        cfg, pair_sample, "rm", ring=True, chosen_key=d.chosen_key, rejected_key=d.rejected_key,
        margin_key=d.margin_key)
    ring = ring_setup(cfg.train, topo)         # None unless train.ring_attn_size > 1
    engine = strategy.prepare_model(load_value_model_for(cfg, cfg.model.path))
    if ring is not None:
        enable_ring(engine)
    ctx = RunContext(cfg, strategy, run_dir, name="rm")
    ckpt = ctx.checkpoints({"model": engine})
    train_rm(engine, strategy, samples, train_cfg=cfg.train, packing=d.packing,
             pad_id=tokenizer.pad_token_id, log=ctx.log, eval_samples=eval_samples, ring=ring,
             ckpt=ckpt)
    stats = None
    if cfg.reward.normalize and not ckpt.stopped:  # every rank scores (ZeRO-3 is collective)
        stats = score_stats(engine, eval_samples or samples, pad_id=tokenizer.pad_token_id,
                            packing=d.packing, device=strategy.device,
                            micro_batch_size=cfg.train.micro_batch_size, ring=ring)
    ctx.finish(engine, tokenizer)  # an HF *ForSequenceClassification: reward.source=model
    export = run_dir / EXPORT_DIR
    if stats is not None and strategy.rank == 0 and (export / "config.json").is_file():
        record_normalization(export, *stats)
        print(f"[rm] reward.normalize: scores have mean {stats[0]:.4g} and std {stats[1]:.4g} "
              f"over {len(eval_samples or samples)} pairs; recorded in {export / 'config.json'}",
              flush=True)


@torch.no_grad()
def score_stats(model, samples, *, pad_id: int, packing: bool, device, micro_batch_size: int,
                ring: Ring | None = None) -> tuple[float, float]:
    """(mean, std) of the scores of every response (chosen and rejected) of `samples`."""
    scores = []
    for i in range(0, len(samples), micro_batch_size):
        c, r = pair_scores(model, samples[i:i + micro_batch_size], pad_id=pad_id,
                           packing=packing, device=device, ring=ring)
        scores += [c.float().cpu(), r.float().cpu()]
    flat = torch.cat(scores)
    return flat.mean().item(), max(flat.std().item(), 1e-6)


def record_normalization(export_dir, mean: float, std: float) -> None:
    """Write mean/std (and normalize_reward) into an exported reward model's config.json,
    atomically."""
    import json
    import os
    config = Path(export_dir) / "config.json"
    values = json.loads(config.read_text())
    values.update({"normalize_reward": True, "mean": float(mean), "std": float(std)})
    tmp = config.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(values, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, config)
