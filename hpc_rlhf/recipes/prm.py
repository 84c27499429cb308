"""Process-reward-model recipe: a label per reasoning step, predicted at a placeholder token.

Each row: prompt (data.input_key), steps (list of strings, data.output_key), labels (one per
step, data.label_key). The sample is prompt + step_1 + TAG + step_2 + TAG ...; at every TAG
the LM's logits restricted to the two reward tokens (BAD, GOOD) classify the step. OpenRLHF's
rows (one text in data.input_key with TAG after each step, e.g. data.prm_step_tag='ки'; hard
'+'/'-' or soft float labels) are read too (data.samples.prm_sample).

    for step, micro-batch:
        logits = model(batch)[placeholder positions][:, [BAD, GOOD]]      # [k, 2]
        loss = cross-entropy(logits, step labels); backward; step
"""
from __future__ import annotations

from functools import partial
from pathlib import Path

import torch

from hpc_rlhf.algos.losses_pref import prm_loss
from hpc_rlhf.data import prm_batch, prm_sample
from hpc_rlhf.engine.logprobs import forward_logits
from hpc_rlhf.models.actor import load_causal_lm
from hpc_rlhf.recipes.common import chat_format, load_tokenizer, load_train_eval, make_strategy
from hpc_rlhf.runtime import RunContext
from hpc_rlhf.runtime.loop import step_loop

def single_token_id(tokenizer, text: str, field: str) -> int:
    """The id of `text`, which must be one token: the step placeholder (data.prm_step_tag) and
    the good/bad tokens (data.prm_good_token / prm_bad_token)."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        raise ValueError(f"{field}={text!r} is {len(ids)} tokens for this tokenizer; it must be "
                         f"exactly one: set {field} to a string the tokenizer keeps whole")
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
        right = total = 0
        for i in range(0, len(eval_samples), t.micro_batch_size):
            logits, labels = scores(engine, eval_samples[i:i + t.micro_batch_size])
            hard = (labels > 0.5).long() if labels.is_floating_point() else labels
            right += int((logits.argmax(-1) == hard).sum())
            total += labels.numel()
        return right / total

    def micro_step(micro: list[int]) -> dict:
        logits, labels = scores(engine, [samples[i] for i in micro])
        loss = prm_loss(logits, labels)
        strategy.backward(loss, engine)
        strategy.step(engine)
        return {"loss": loss.item()}

    return step_loop(model=engine, strategy=strategy, train_cfg=t, num_samples=len(samples),
                     micro_step=micro_step, log=log, ckpt=ckpt,
                     evaluate=(lambda: {"eval_step_accuracy": evaluate()})
                     if eval_samples else None)


def run(cfg, topo, run_dir: Path) -> None:
    strategy = make_strategy(cfg)
    tokenizer = load_tokenizer(cfg.model.path)
    d = cfg.data
    tag = single_token_id(tokenizer, d.prm_step_tag, "data.prm_step_tag")
    reward_ids = (single_token_id(tokenizer, d.prm_bad_token, "data.prm_bad_token"),
                  single_token_id(tokenizer, d.prm_good_token, "data.prm_good_token"))
    make = partial(prm_sample, fmt=chat_format(tokenizer, d), input_key=d.input_key,
                   output_key=d.output_key, label_key=d.label_key, step_tag_id=tag,
                   step_tag=d.prm_step_tag)
    samples, eval_samples, _ = load_train_eval(d, make, name="prm",
                                               rank=strategy.rank)
    engine = strategy.prepare_model(load_causal_lm(cfg.model.path, cfg.model, trained=True))
    ctx = RunContext(cfg, strategy, run_dir, name="prm")
    ckpt = ctx.checkpoints({"model": engine})
    train_prm(engine, strategy, samples, train_cfg=cfg.train, packing=d.packing,
              pad_id=tokenizer.pad_token_id, reward_ids=reward_ids, log=ctx.log,
              eval_samples=eval_samples, ckpt=ckpt)
    ctx.finish(engine, tokenizer)
