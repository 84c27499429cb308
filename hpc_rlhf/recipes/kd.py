"""Knowledge distillation recipe: the student matches the teacher's next-token distribution
(forward KL(teacher || student)) on the response tokens of an SFT dataset.

    samples = load_samples(data.prompts, sft_sample)
    student = strategy.prepare_model(model.path); teacher = prepare_eval_model(train.teacher_path)
    for step, micro-batch:
        loss = kd_coef * kd_forward_kl(student, teacher, response mask)
               + (1 - kd_coef) * NLL of the response tokens;  backward; step
train.kd_coef = 1 (the default) is pure distillation; OpenRLHF's --kd_coef mixes the same way
(its default is 0.4; its distillation term is the cross-entropy, which differs from the KL by
the teacher's entropy: same gradient, a larger logged value). The teacher must share the
student's tokenizer (same vocabulary).
"""
from __future__ import annotations

from functools import partial
from pathlib import Path

import torch

from hpc_rlhf.algos.losses_pref import kd_forward_kl
from hpc_rlhf.algos.losses_sft import sft_loss
from hpc_rlhf.data import sft_batch, sft_sample
from hpc_rlhf.engine.logprobs import logprobs_from_logits
from hpc_rlhf.engine.logprobs import forward_logits
from hpc_rlhf.models.actor import load_causal_lm
from hpc_rlhf.recipes.common import setup_dataset_recipe
from hpc_rlhf.runtime import RunContext
from hpc_rlhf.runtime.loop import step_loop


def kd_batch_loss(student, teacher, chunk, *, pad_id, packing, device, kd_coef: float = 1.0
                  ) -> torch.Tensor:
    batch = sft_batch(chunk, pad_id=pad_id, packing=packing).to(device)
    with torch.no_grad():
        t_logits = forward_logits(teacher, batch)                 # [b, T, v]
    s_logits = forward_logits(student, batch)                     # [b, T, v]
    if s_logits.shape != t_logits.shape:
        raise ValueError(f"student logits {tuple(s_logits.shape)} and teacher logits "
                         f"{tuple(t_logits.shape)} differ: train.teacher_path must use the "
                         "student's vocabulary")
    # logits at t - 1 predict token t, the target the loss mask marks
    mask = batch.loss_mask[:, 1:]
    kl = kd_forward_kl(s_logits[:, :-1], t_logits[:, :-1], mask)
    if kd_coef == 1.0:
        return kl
    nll = sft_loss(logprobs_from_logits(s_logits[:, :-1], batch.input_ids[:, 1:]), mask)
    return kd_coef * kl + (1.0 - kd_coef) * nll


def train_kd(student, teacher, strategy, samples, *, train_cfg, packing, pad_id, log,
             eval_samples=None, ckpt=None) -> list[dict]:
    t = train_cfg
    loss_of = partial(kd_batch_loss, pad_id=pad_id, packing=packing, device=strategy.device,
                      kd_coef=t.kd_coef)

    @torch.no_grad()
    def evaluate():
        chunks = [eval_samples[i:i + t.micro_batch_size]
                  for i in range(0, len(eval_samples), t.micro_batch_size)]
        return sum(loss_of(student, teacher, c).item() for c in chunks) / len(chunks)

    def micro_step(micro: list[int]) -> dict:
        loss = loss_of(student, teacher, [samples[i] for i in micro])
        strategy.backward(loss, student)
        strategy.step(student)
        return {"loss": loss.item()}

    return step_loop(model=student, strategy=strategy, train_cfg=t, num_samples=len(samples),
                     micro_step=micro_step, log=log, ckpt=ckpt,
                     evaluate=(lambda: {"eval_kl": evaluate()}) if eval_samples else None)


def run(cfg, topo, run_dir: Path) -> None:
    if not cfg.train.teacher_path:
        raise ValueError("train.trainer=kd needs train.teacher_path (an HF directory or "
                         "'tiny:llama'-style name sharing the student's tokenizer)")
    strategy, tokenizer, samples, eval_samples = setup_dataset_recipe(
        cfg, sft_sample, "kd", output_key=cfg.data.output_key)
    student = strategy.prepare_model(load_causal_lm(cfg.model.path, cfg.model, trained=True))
    teacher = strategy.prepare_eval_model(load_causal_lm(cfg.train.teacher_path, cfg.model))
    ctx = RunContext(cfg, strategy, run_dir, name="kd")
    ckpt = ctx.checkpoints({"model": student})
    train_kd(student, teacher, strategy, samples, train_cfg=cfg.train, packing=cfg.data.packing,
             pad_id=tokenizer.pad_token_id, log=ctx.log, eval_samples=eval_samples, ckpt=ckpt)
    ctx.finish(student, tokenizer)
