"""Supervised fine-tuning recipe: next-token loss on responses / assistant turns only.

    samples = load_samples(data.prompts, sft_sample)      # chat template, max_len filter
    engine  = strategy.prepare_model(policy)              # ZeRO-3 on every rank
    for step:                                             # batch_size samples per step
        for micro-batch of this rank:                     # padded or packed
            loss = sft_loss(token logprobs, loss_mask); backward; step

train.ring_attn_size > 1 (RingAttention, see ring_sft.py): each micro-batch is packed into one
row whose sequence is split over the ring; ring ranks read the same micro-batches, and the
loss is backpropagated times the ring size (DeepSpeed averages over ring ranks too).
"""
from __future__ import annotations

from functools import partial
from pathlib import Path

import torch

from hpc_rlhf.algos.losses_sft import sft_loss
from hpc_rlhf.data import load_samples, pretrain_sample, sft_batch, sft_sample
from hpc_rlhf.engine.logprobs import forward_token_logprobs
from hpc_rlhf.engine.moe import attach_router_aux_loss
from hpc_rlhf.engine.ring_sft import RingSFT, ring_sft_loss, ring_sft_setup
from hpc_rlhf.models.actor import load_causal_lm
from hpc_rlhf.recipes.common import chat_format, load_tokenizer, make_strategy
from hpc_rlhf.ring_attn import enable_ring_attention
from hpc_rlhf.runtime import RunContext, StepCheckpoints, StepLog
from hpc_rlhf.runtime.loop import step_loop


def sft_batch_loss(model, samples, *, pad_id: int, packing: bool, device,
                   ring: RingSFT | None = None) -> torch.Tensor:
    if ring is not None:  # one packed row split over the ring (packing is implied)
        return ring_sft_loss(model, samples, pad_id=pad_id, ring=ring, device=device)
    batch = sft_batch(samples, pad_id=pad_id, packing=packing).to(device)
    return sft_loss(forward_token_logprobs(model, batch), batch.loss_mask)


@torch.no_grad()
def eval_sft_loss(model, samples, *, pad_id: int, packing: bool, device,
                  micro_batch_size: int, ring: RingSFT | None = None) -> float:
    """Mean per-batch loss over `samples`; every rank evaluates all of them (ZeRO-3 forwards
    are collective, so all ranks must run the same number)."""
    losses = [sft_batch_loss(model, samples[i:i + micro_batch_size], pad_id=pad_id,
                             packing=packing, device=device, ring=ring).item()
              for i in range(0, len(samples), micro_batch_size)]
    return sum(losses) / len(losses)


def train_sft(engine, strategy, samples, *, train_cfg, packing: bool, pad_id: int,
              log: StepLog, eval_samples=None, ring: RingSFT | None = None,
              ckpt: StepCheckpoints | None = None) -> list[dict]:
    """The loop. Returns the metric history (also logged). `ring` (ring_sft_setup): sequence
    parallelism; the engine's model must then use ring attention. `ckpt`: resume from the
    newest complete checkpoint, save on schedule / at the end / on a signal (then stop)."""
    evaluate = partial(eval_sft_loss, pad_id=pad_id, packing=packing, device=strategy.device,
                       micro_batch_size=train_cfg.micro_batch_size, ring=ring)
    # MoE: loss + train.aux_loss_coef x router load-balancing loss (off at 0; refused on dense)
    aux = attach_router_aux_loss(engine, getattr(train_cfg, "aux_loss_coef", 0.0))

    def micro_step(micro: list[int]) -> dict:
        loss = sft_batch_loss(engine, [samples[i] for i in micro], pad_id=pad_id,
                              packing=packing, device=strategy.device, ring=ring)
        aux_m: dict = {}
        total = aux.add_to(loss, aux_m)   # "loss" stays the SFT loss; the aux term is logged
        strategy.backward(ring.scale_for_backward(total) if ring else total, engine)
        strategy.step(engine)
        out = {"loss": loss.item()}
        if aux_m:
            out["moe_aux_loss"] = sum(aux_m.values()) / len(aux_m)
        return out

    # data-parallel coordinates: with a ring, all its ranks read the same micro-batches
    return step_loop(model=engine, strategy=strategy, train_cfg=train_cfg,
                     num_samples=len(samples), micro_step=micro_step, log=log, ckpt=ckpt,
                     evaluate=(lambda: {"eval_loss": evaluate(engine, eval_samples)})
                     if eval_samples else None,
                     dp=(ring.dp_rank, ring.dp_size) if ring else None)


def run(cfg, topo, run_dir: Path) -> None:
    strategy = make_strategy(cfg, ring=True)  # grad_accum from world / (autotp x ring)
    ring = ring_sft_setup(cfg.train, topo)    # None unless train.ring_attn_size > 1
    tokenizer = load_tokenizer(cfg.model.path)
    fmt = chat_format(tokenizer, cfg.data)
    d = cfg.data
    make = (partial(pretrain_sample, fmt=fmt, input_key=d.input_key) if d.pretrain_mode else
            partial(sft_sample, fmt=fmt, input_key=d.input_key, output_key=d.output_key))
    samples, stats = load_samples(d.prompts, make, max_len=d.max_len,
                                  skip_bad_rows=d.skip_bad_rows, limit=d.max_samples or None,
                                  probs=d.prompts_probs, seed=d.seed)
    eval_samples = None
    if d.eval_prompts:
        eval_samples, _ = load_samples(d.eval_prompts, make, max_len=d.max_len,
                                       skip_bad_rows=d.skip_bad_rows)
    if strategy.rank == 0:
        print(f"sft data {d.prompts}: {stats.summary()}", flush=True)
    model = load_causal_lm(cfg.model.path, cfg.model, trained=True)
    if ring is not None:
        enable_ring_attention(model)  # attention "ring"; forwards need ring_attention_scope
    engine = strategy.prepare_model(model)
    ctx = RunContext(cfg, strategy, run_dir, name="sft")
    ckpt = ctx.checkpoints({"model": engine})
    train_sft(engine, strategy, samples, train_cfg=cfg.train, packing=d.packing,
              pad_id=tokenizer.pad_token_id, log=ctx.log, eval_samples=eval_samples, ring=ring,
              ckpt=ckpt)
    ctx.finish(engine, tokenizer)
