"""Supervised fine-tuning recipe: next-token loss on responses / assistant turns only.

    samples = load_samples(data.prompts, sft_sample)      # chat template, max_len filter
    engine  = strategy.prepare_model(policy)              # ZeRO-3 on every rank
    for step:                                             # batch_size samples per step
        for micro-batch of this rank:                     # padded or packed
            loss = sft_loss(token logprobs, loss_mask); backward; step
"""
from __future__ import annotations

from functools import partial
from pathlib import Path

import torch

from hpc_rlhf.data import load_samples, rank_micro_batches, sft_batch, sft_sample, step_indices
from hpc_rlhf.train.losses_sft import sft_loss
from hpc_rlhf.train.recipe_common import (MetricLog, chat_format, export_hf, forward_token_logprobs,
                                          load_causal_lm, load_tokenizer, make_strategy)


def sft_batch_loss(model, samples, *, pad_id: int, packing: bool, device) -> torch.Tensor:
    batch = sft_batch(samples, pad_id=pad_id, packing=packing).to(device)
    return sft_loss(forward_token_logprobs(model, batch), batch.loss_mask)


@torch.no_grad()
def eval_sft_loss(model, samples, *, pad_id: int, packing: bool, device,
                  micro_batch_size: int) -> float:
    """Mean per-batch loss over `samples`; every rank evaluates all of them (ZeRO-3 forwards
    are collective, so all ranks must run the same number)."""
    losses = [sft_batch_loss(model, samples[i:i + micro_batch_size], pad_id=pad_id,
                             packing=packing, device=device).item()
              for i in range(0, len(samples), micro_batch_size)]
    return sum(losses) / len(losses)


def train_sft(engine, strategy, samples, *, train_cfg, packing: bool, pad_id: int,
              log: MetricLog, eval_samples=None) -> list[dict]:
    """The loop. Returns the metric history (also logged)."""
    evaluate = partial(eval_sft_loss, pad_id=pad_id, packing=packing, device=strategy.device,
                       micro_batch_size=train_cfg.micro_batch_size)
    if eval_samples:
        log(-1, {"eval_loss": evaluate(engine, eval_samples)})
    for step in range(train_cfg.num_steps):
        engine.train()
        indices = step_indices(len(samples), train_cfg.batch_size, step, train_cfg.seed)
        losses = []
        for micro in rank_micro_batches(indices, strategy.dp_rank, strategy.dp_size,
                                        train_cfg.micro_batch_size):
            loss = sft_batch_loss(engine, [samples[i] for i in micro], pad_id=pad_id,
                                  packing=packing, device=strategy.device)
            strategy.backward(loss, engine)
            strategy.step(engine)
            losses.append(loss.item())
        metrics = {"loss": strategy.all_reduce_mean(sum(losses) / len(losses))}
        if eval_samples and step == train_cfg.num_steps - 1:
            engine.eval()
            metrics["eval_loss"] = evaluate(engine, eval_samples)
        log(step, metrics)
    return log.history


def run(cfg, topo, run_dir: Path) -> None:
    strategy = make_strategy(cfg)
    tokenizer = load_tokenizer(cfg.model.path)
    fmt = chat_format(tokenizer, cfg.data)
    d = cfg.data
    make = partial(sft_sample, fmt=fmt, input_key=d.input_key, output_key=d.output_key)
    samples, stats = load_samples(d.prompts, make, max_len=d.max_len,
                                  skip_bad_rows=d.skip_bad_rows)
    eval_samples = None
    if d.eval_prompts:
        eval_samples, _ = load_samples(d.eval_prompts, make, max_len=d.max_len,
                                       skip_bad_rows=d.skip_bad_rows)
    if strategy.rank == 0:
        print(f"sft data {d.prompts}: {stats.summary()}", flush=True)
    engine = strategy.prepare_model(load_causal_lm(cfg.model.path, cfg.model))
    log = MetricLog(run_dir, strategy.rank, cfg.logging.log_every)
    train_sft(engine, strategy, samples, train_cfg=cfg.train, packing=d.packing,
              pad_id=tokenizer.pad_token_id, log=log, eval_samples=eval_samples)
    if cfg.checkpoint.export_hf:
        export_hf(strategy, engine, tokenizer, Path(run_dir) / "hf")
