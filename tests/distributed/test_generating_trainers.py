"""Rejection sampling, iterative DPO and conditional SFT on the tiny Llama, 2 CPU ranks (gloo),
DeepSpeed ZeRO-3, colocated HF rollout engines (rollout.engine=hf), built-in `repeat` task.

One spawned pair of processes runs the three recipes through their `run(cfg, topo, run_dir)`
entries (configs/*_tiny.yaml + overrides); the tests read each run's metrics.jsonl. The pure
pieces (best-of-n, best-vs-worst pairs, score tags) are checked against plain references.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import torch

from distlib import ROOT, read_metrics, write_scored_repeat
from testlib import spawn

TIMEOUT_S = 240
RS_ROUNDS, DPO_ROUNDS = 6, 4


def _worker(rank: int, world: int, port: int, tmp: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import torch.distributed as dist
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from hpc_rlhf.config import load_config
    tmp = Path(tmp)
    common = ["rollout.engine=hf", "logging.log_every=1000"]
    jobs = [  # (name, module, config, overrides)
        ("rs", "hpc_rlhf.recipes.rejection_sampling", "rs_tiny",
         [*common, f"train.num_steps={RS_ROUNDS}", "train.actor_lr=1e-2"]),
        ("idpo", "hpc_rlhf.recipes.iterative_dpo", "iterative_dpo_tiny",
         [*common, f"train.num_steps={DPO_ROUNDS}"]),
        ("csft", "hpc_rlhf.recipes.csft", "csft_tiny",
         ["logging.log_every=1000", f"data.prompts={tmp / 'csft.jsonl'}",
          "checkpoint.export_hf=true"]),
    ]
    for name, module, config, extra in jobs:
        cfg = load_config(ROOT / "configs" / f"{config}.yaml", extra)
        t0 = time.time()
        __import__(module, fromlist=["run"]).run(cfg, None, tmp / name)
        if rank == 0:
            (tmp / name / "wall_s").write_text(f"{time.time() - t0:.1f}")
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from hpc_rlhf.models.resolve import cache_dir
    from hpc_rlhf.models.tiny import ensure_tiny_model
    tmp = tmp_path_factory.mktemp("generating")
    write_scored_repeat(tmp / "csft.jsonl", 256)
    old = os.environ.get("HPC_RLHF_CACHE")   # private model cache, as in test_trainers.py
    os.environ["HPC_RLHF_CACHE"] = str(tmp / "cache")
    try:
        ensure_tiny_model(cache_dir() / "models", arch="llama")  # built before the ranks race
        t0 = time.time()
        spawn(_worker, 2, (str(tmp),), TIMEOUT_S)
    finally:
        if old is None:
            os.environ.pop("HPC_RLHF_CACHE", None)
        else:
            os.environ["HPC_RLHF_CACHE"] = old
    print(f"\nrs+iterative_dpo+csft on 2 ranks: {time.time() - t0:.1f} s")
    return tmp


def _show(name: str, rows: list[dict], run_dir: Path, keys: tuple[str, ...]) -> None:
    print(f"\n{name} ({(run_dir / 'wall_s').read_text()} s)")
    for r in rows:
        print("  ", {k: round(r[k], 4) for k in ("step", *keys) if k in r})


# ---- pure pieces against plain references ---------------------------------------------------
@pytest.mark.unit
def test_best_per_prompt_and_pairs_match_reference():
    from hpc_rlhf.recipes.iterative_dpo import best_worst
    from hpc_rlhf.recipes.rejection_sampling import best_per_prompt
    g = torch.Generator().manual_seed(0)
    n, p = 4, 50
    rewards = torch.randint(0, 3, (p * n,), generator=g).float()   # many ties on purpose
    idx, best = best_per_prompt(rewards, n)
    b, w, has_pair = best_worst(rewards, n)
    for i in range(p):
        row = rewards[i * n:(i + 1) * n].tolist()
        first_max = row.index(max(row))
        assert idx[i] == first_max == b[i] and best[i] == max(row)
        assert w[i] == row.index(min(row))
        assert bool(has_pair[i]) == (max(row) != min(row))


@pytest.mark.unit
def test_csft_tags_and_samples():
    from hpc_rlhf.data import ChatFormat
    from hpc_rlhf.data.readers import Row
    from hpc_rlhf.models.tiny import build_tokenizer
    from hpc_rlhf.recipes.csft import conditioned_prompt, csft_sample, normalize
    assert conditioned_prompt("Repeat a", normalize(6, 0, 8)) == "Repeat a\n<rm_score>: 0.8"
    assert normalize(-3, 0, 8) == 0.0 and normalize(9, 0, 8) == 1.0
    chat = [{"role": "system", "content": "be nice"}, {"role": "user", "content": "hi"}]
    assert conditioned_prompt(chat, 1.0) == [chat[0], {"role": "user",
                                                       "content": "hi\n<rm_score>: 1.0"}]
    assert chat[1]["content"] == "hi"                   # the caller's messages are not changed
    tok = build_tokenizer()
    fmt = ChatFormat(tok)
    s = csft_sample(Row({"prompt": "Repeat a", "response": "aaaa", "score": 2}, "f", 0), fmt,
                    "prompt", "response", "score", 0.0, 8.0)
    text = tok.decode(s.input_ids)
    assert text == "<|user|>Repeat a\n<rm_score>: 0.2<|assistant|>aaaa</s>", text
    trained = tok.decode([t for t, m in zip(s.input_ids, s.loss_mask) if m])
    assert trained == "aaaa</s>", trained


# ---- the recipes on 2 ranks ------------------------------------------------------------------
@pytest.mark.distributed
@pytest.mark.deepspeed
def test_rejection_sampling_raises_best_reward(runs):
    rows = read_metrics(runs / "rs")
    _show("rejection sampling", rows, runs / "rs",
          ("reward/best", "reward/mean", "sft/loss_first", "sft/loss_last"))
    assert [r["step"] for r in rows] == list(range(1, RS_ROUNDS + 1))
    assert all(r["kept"] == 16 for r in rows)                 # one kept sample per prompt
    best = [r["reward/best"] for r in rows]
    assert best[-2] + best[-1] > 2.5 * (best[0] + best[1]), best
    # The SFT loss on each round's kept samples falls while training on them.
    assert all(r["sft/loss_last"] < r["sft/loss_first"] for r in rows), rows


@pytest.mark.distributed
@pytest.mark.deepspeed
def test_iterative_dpo_raises_margin(runs):
    rows = read_metrics(runs / "idpo")
    _show("iterative dpo", rows, runs / "idpo",
          ("reward/best", "reward/mean", "pairs", "margin/before", "margin/after"))
    assert [r["step"] for r in rows] == list(range(1, DPO_ROUNDS + 1))
    trained = [r for r in rows if r["pairs"] > 0]
    assert len(trained) >= DPO_ROUNDS - 1, rows
    assert abs(rows[0]["margin/before"]) < 1e-5        # policy == reference before round 0
    for r in trained:   # each round's DPO raises the margin on its fresh pairs
        assert r["margin/after"] > r["margin/before"] + 0.3, r
        assert r["accuracy/after"] >= 0.75, r


@pytest.mark.distributed
@pytest.mark.deepspeed
def test_csft_top_tag_gives_better_responses(runs):
    """After CSFT, prompts tagged with the top score get more right letters than prompts
    tagged with the bottom score (greedy, held-out task seed)."""
    from hpc_rlhf.data import ChatFormat
    from hpc_rlhf.data.tasks import make_task, repeat_reward
    from hpc_rlhf.recipes.common import load_tokenizer
    from hpc_rlhf.recipes.csft import conditioned_prompt_ids
    from hpc_rlhf.rollout import HFEngine, SamplingConfig
    from transformers import AutoModelForCausalLM
    rows = read_metrics(runs / "csft")
    _show("csft (first and last step)", [rows[0], rows[-1]], runs / "csft", ("loss",))
    train = [r["loss"] for r in rows if r["step"] > 0]
    assert train[-1] < 0.6 * train[0], train

    hf = runs / "csft" / "export"
    tok = load_tokenizer(str(hf))
    fmt = ChatFormat(tok)
    engine = HFEngine(AutoModelForCausalLM.from_pretrained(hf), eos_token_ids=[tok.eos_token_id],
                      pad_token_id=tok.pad_token_id)
    tasks = make_task("task:repeat", 10, seed=123)
    greedy = SamplingConfig(max_new_tokens=8, temperature=0.0)

    def mean_reward(score: float) -> float:
        outs = engine.generate([conditioned_prompt_ids(fmt, t.prompt, score) for t in tasks],
                               greedy)
        texts = tok.batch_decode([o.response_ids for o in outs], skip_special_tokens=True)
        return sum(repeat_reward(x, t.label) for x, t in zip(texts, tasks)) / len(tasks)

    top, bottom = mean_reward(1.0), mean_reward(0.0)
    print(f"csft greedy reward: top tag {top:.3f}, bottom tag {bottom:.3f}")
    assert top > bottom + 0.4, (top, bottom)
