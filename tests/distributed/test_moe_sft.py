"""SFT of a tiny MoE (Mixtral) with train.aux_loss_coef under DeepSpeed ZeRO-3 on 2 gloo ranks.

The recipe's `run(cfg, topo, run_dir)` trains 5 steps twice: coef 0 and coef COEF. Each rank
trains one padded micro-batch of 4 samples per step; DeepSpeed averages the two ranks'
gradients. The reference, plain torch in this process, does the same arithmetic in one
backward: loss = mean over the step's 2 micro-batches of (SFT loss + coef x HF aux_loss),
clip_grad_norm_ 1.0, torch AdamW (lr 3e-3, betas 0.9/0.95, eps 1e-8, no decay).
Asserted: both logged SFT-loss trajectories match the reference of the same coef within
relative 1e-5 (fp32, only reduction order differs), the logged aux loss too, and the coef run
departs from the coef-0 run by more than 100x that tolerance (the term really trains).
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
import torch

from distlib import ROOT
from testlib import spawn

STEPS, BATCH, MICRO, COEF = 5, 8, 4, 0.5
REL_TOL = 1e-5


def _overrides(tmp: Path, coef: float) -> list[str]:
    return [f"model.path={tmp / 'moe'}", f"data.prompts={tmp / 'data' / 'sft_train.jsonl'}",
            "data.eval_prompts=", f"train.num_steps={STEPS}", f"train.batch_size={BATCH}",
            f"train.micro_batch_size={MICRO}", "data.packing=false",
            f"train.aux_loss_coef={coef}", "logging.log_every=100"]


def _cfg(tmp: Path, coef: float):
    from hpc_rlhf.config import load_config
    return load_config(ROOT / "configs" / "sft_tiny.yaml", _overrides(tmp, coef))


def _worker(rank: int, world: int, port: int, tmp: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from hpc_rlhf.recipes import sft
    for name, coef in (("coef0", 0.0), ("coef", COEF)):
        t0 = time.time()
        sft.run(_cfg(Path(tmp), coef), None, Path(tmp) / name)
        if rank == 0:
            (Path(tmp) / name / "wall_s").write_text(f"{time.time() - t0:.1f}")


def _reference(tmp: Path, coef: float) -> tuple[list[float], list[float]]:
    """(SFT loss per step, aux loss per step), each the mean over the step's micro-batches."""
    from transformers import AutoModelForCausalLM

    from hpc_rlhf.algos.losses_sft import sft_loss
    from hpc_rlhf.data import load_samples, rank_micro_batches, sft_batch, sft_sample, step_indices
    from hpc_rlhf.recipes.common import chat_format, load_tokenizer
    cfg = _cfg(tmp, coef)
    tok = load_tokenizer(cfg.model.path)
    d = cfg.data
    samples, _ = load_samples(d.prompts, lambda row: sft_sample(
        row, chat_format(tok, d), d.input_key, d.output_key), max_len=d.max_len)
    model = AutoModelForCausalLM.from_pretrained(tmp / "moe", dtype=torch.float32).train()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.train.actor_lr, betas=(0.9, 0.95),
                            eps=1e-8, weight_decay=0.0)
    sft_losses, aux_losses = [], []
    for step in range(STEPS):
        idx = step_indices(len(samples), BATCH, step, cfg.train.seed)
        micro = [m for r in range(2) for m in rank_micro_batches(idx, r, 2, MICRO)]
        assert len(micro) == 2
        total, lm, ax = 0.0, [], []
        for m in micro:
            batch = sft_batch([samples[i] for i in m], pad_id=tok.pad_token_id, packing=False)
            out = model(**batch.model_inputs(), output_router_logits=True)
            logp = torch.log_softmax(out.logits[:, :-1].float(), -1).gather(
                -1, batch.input_ids[:, 1:, None]).squeeze(-1)          # [b, T-1]
            mask = batch.loss_mask[:, 1:].float()
            loss = (-logp * mask).sum() / mask.sum()
            lm.append(loss.item())
            ax.append(out.aux_loss.item())
            total = total + (loss + coef * out.aux_loss) / len(micro)
            # the recipe's own loss must agree with this plain one (same batch)
            assert abs(sft_loss(torch.nn.functional.pad(logp, (1, 0)), batch.loss_mask).item()
                       - loss.item()) < 1e-5
        opt.zero_grad()
        total.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sft_losses.append(sum(lm) / len(lm))
        aux_losses.append(sum(ax) / len(ax))
    return sft_losses, aux_losses


def _history(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.distributed
@pytest.mark.deepspeed
@pytest.mark.timeout(300)
def test_moe_sft_aux_loss_under_zero3_matches_torch_reference(tmp_path):
    from hpc_rlhf.data.synthetic import write_toy_datasets
    from hpc_rlhf.models.tiny import build_tiny_model
    write_toy_datasets(tmp_path / "data", n_train=64, n_eval=8)
    build_tiny_model(tmp_path / "moe", arch="mixtral")
    t0 = time.time()
    spawn(_worker, 2, (str(tmp_path),), timeout_s=240)
    spawn_s = time.time() - t0
    runs = {k: [r for r in _history(tmp_path / k) if r["step"] > 0] for k in ("coef0", "coef")}
    got = {k: [r["loss"] for r in h] for k, h in runs.items()}
    got_aux = [r["moe_aux_loss"] for r in runs["coef"]]
    assert all("moe_aux_loss" not in r for r in runs["coef0"])    # off: nothing recorded
    ref0, _ = _reference(tmp_path, 0.0)
    ref, ref_aux = _reference(tmp_path, COEF)
    rel = lambda a, b: abs(a - b) / abs(b)                         # noqa: E731
    worst = {"coef0": max(map(rel, got["coef0"], ref0)), "coef": max(map(rel, got["coef"], ref)),
             "aux": max(map(rel, got_aux, ref_aux))}
    apart = max(map(rel, got["coef"], got["coef0"]))
    walls = {k: (tmp_path / k / "wall_s").read_text() for k in runs}
    print(f"\ncoef0 {got['coef0']}\ncoef {COEF} {got['coef']}\naux {got_aux}\nref aux {ref_aux}"
          f"\nmax rel diff vs reference {worst}; coef vs coef0 max rel {apart:.2e}"
          f"\nrun wall s {walls}; spawn + 2 runs {spawn_s:.1f} s")
    assert len(got["coef0"]) == len(got["coef"]) == STEPS
    assert got["coef0"][-1] < got["coef0"][0]                      # it trains
    assert worst["coef0"] <= REL_TOL and worst["coef"] <= REL_TOL and worst["aux"] <= REL_TOL, worst
    assert got["coef"][0] == pytest.approx(got["coef0"][0], rel=REL_TOL)   # same start
    assert apart > 100 * REL_TOL, apart                            # the aux term changes training
