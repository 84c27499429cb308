"""Process-reward-model recipe: a label per reasoning step, predicted at a placeholder token.

Each row: prompt (data.input_key), steps (list of strings, data.output_key), labels (one per
step, data.label_key). The sample is prompt + step_1 + TAG + step_2 + TAG ...; at every TAG
the LM's logits restricted to the two reward tokens (BAD, GOOD) classify the step.

    for step, micro-batch:
        logits = model(batch)[placeholder positions][:, [BAD, GOOD]]      # [k, 2]
        loss = cross-entropy(logits, step labels); backward; step
"""
from __future__ import annotations

from functools import partial
from pathlib import Path

import torch

from hpc_rlhf.data import prm_batch, prm_sample, rank_micro_batches, step_indices
from hpc_rlhf.train.losses_pref import prm_loss
from hpc_rlhf.train.recipe_common import (chat_format, export_hf, forward_logits, load_causal_lm,
                                          load_tokenizer, load_train_eval, make_strategy,
                                          MetricLog, StepCheckpoints)

# Placeholder after each step and the reward tokens (no config fields yet); each must be one
# token of the tokenizer.
STEP_TAG, GOOD_TOKEN, BAD_TOKEN = "\n", "+", "-"


def single_token_id(tokenizer, text: str, what: str) -> int:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        raise ValueError(f"PRM {what} {text!r} is {len(ids)} tokens for this tokenizer; it must "
                         "be exactly one (change hpc_rlhf.train.prm constants)")
    return ids[0]


def step_logits(model, chunk, *, pad_id, packing, device, reward_ids):
    """(logits of (bad, good) at every step placeholder [k, 2], labels [k])."""
    batch, pos, labels = prm_batch(chunk, pad_id=pad_id, packing=packing)
    batch = batch.to(device)
    logits = forward_logits(model, batch)                          # [b, T, v]
    flat = logits.reshape(-1, logits.shape[-1])[pos.to(device)]    # [k, v]
    return flat[:, reward_ids], labels.to(device)


def train_prm(engine, strategy, samples, *, train_cfg, packing, pad_id, reward_ids, log,
              eval_samples=None, ckpt=None) -> list[dict]:
    t = train_cfg
    scores = partial(step_logits, pad_id=pad_id, packing=packing, device=strategy.device,
                     reward_ids=list(reward_ids))

    @torch.no_grad()
    def evaluate():
        engine.eval()
        right = total = 0
        for i in range(0, len(eval_samples), t.micro_batch_size):
            logits, labels = scores(engine, eval_samples[i:i + t.micro_batch_size])
            right += int((logits.argmax(-1) == labels).sum())
            total += labels.numel()
        return right / total

    start = ckpt.resume() if ckpt is not None else 0  # StepCheckpoints
    if eval_samples and start == 0:
        log(-1, {"eval_step_accuracy": evaluate()})
    for step in range(start, t.num_steps):
        engine.train()
        indices = step_indices(len(samples), t.batch_size, step, t.seed)
        losses = []
        for micro in rank_micro_batches(indices, strategy.dp_rank, strategy.dp_size,
                                        t.micro_batch_size):
            logits, labels = scores(engine, [samples[i] for i in micro])
            loss = prm_loss(logits, labels)
            strategy.backward(loss, engine)
            strategy.step(engine)
            losses.append(loss.item())
        metrics = {"loss": strategy.all_reduce_mean(sum(losses) / len(losses))}
        if eval_samples and step == t.num_steps - 1:
            metrics["eval_step_accuracy"] = evaluate()
        log(step, metrics)
        if ckpt is not None and ckpt.after_step(step + 1):
            break  # checkpointed on a signal: the launcher requeues the job
    return log.history


def run(cfg, topo, run_dir: Path) -> None:
    strategy = make_strategy(cfg)
    tokenizer = load_tokenizer(cfg.model.path)
    tag = single_token_id(tokenizer, STEP_TAG, "step tag")
    reward_ids = (single_token_id(tokenizer, BAD_TOKEN, "bad token"),
                  single_token_id(tokenizer, GOOD_TOKEN, "good token"))
    d = cfg.data
    make = partial(prm_sample, fmt=chat_format(tokenizer, d), input_key=d.input_key,
                   output_key=d.output_key, label_key=d.label_key, step_tag_id=tag)
    samples, eval_samples, _ = load_train_eval(d, make, name="prm",
                                               rank=strategy.rank)
    engine = strategy.prepare_model(load_causal_lm(cfg.model.path, cfg.model))
    log = MetricLog(run_dir, strategy.rank, cfg.logging.log_every)
    ckpt = StepCheckpoints(cfg, strategy, {"model": engine}, run_dir)
    train_prm(engine, strategy, samples, train_cfg=cfg.train, packing=d.packing,
              pad_id=tokenizer.pad_token_id, reward_ids=reward_ids, log=log,
              eval_samples=eval_samples, ckpt=ckpt)
    if cfg.checkpoint.export_hf and not ckpt.stopped:
        export_hf(strategy, engine, tokenizer, Path(run_dir) / "hf")
