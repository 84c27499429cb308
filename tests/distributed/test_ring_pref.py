"""DPO, RM and KTO with train.ring_attn_size=2 are a config change: same loss trajectory as
ring size 1.

Every run goes through the recipe's `run(cfg, None, run_dir)` (DeepSpeed ZeRO-3, tiny Llama,
generated "reverse a word" pairs / labelled responses, 5 optimizer steps of 8 samples in
micro-batches of 4, eval set of 8 before and after):
  base:       ring 1 in a world of ONE process (2 micro-batches accumulated per step);
  ring2:      ring 2 on 2 gloo ranks (one ring; both ranks read both micro-batches, each packed
              into one row split over the ring; loss x 2 in backward);
  dp2:        ring 1 on 2 ranks (2 data-parallel ranks, 1 micro-batch each; DPO only);
  dp2_ring2:  ring 2 on 4 ranks = 2 data-parallel rings of 2 (DPO only, its own test).
The optimizer sees the mean of the same micro-batch gradients in every run (KTO's z0 is a mean
over the step's data-parallel ranks, so KTO is compared with the 1-process run only).
Tolerance on every logged train/eval number: |a - b| <= 1e-5 x max(|a|, 1) (fp32, different
reduction orders; absolute below 1 because some metrics, e.g. DPO's eval logp margin, are
small differences of sums of ~100 logprobs).
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
STEPS, BATCH, MICRO = 5, 8, 4
REL_TOL = 1e-5

pytestmark = [pytest.mark.distributed, pytest.mark.deepspeed]


def _cfg(tmp: Path, trainer: str, ring: int):
    from hpc_rlhf.config import load_config
    data = tmp / "data"
    kind = {"dpo": "pairs", "rm": "pairs", "kto": "kto"}[trainer]
    base = {"dpo": "dpo_tiny", "rm": "rm_tiny", "kto": "sft_tiny"}[trainer]
    return load_config(ROOT / "configs" / f"{base}.yaml", [
        f"train.trainer={trainer}", f"data.prompts={data / f'{kind}_train.jsonl'}",
        f"data.eval_prompts={data / f'{kind}_eval.jsonl'}", "data.label_key=label",
        f"train.ring_attn_size={ring}", f"train.num_steps={STEPS}", f"train.batch_size={BATCH}",
        f"train.micro_batch_size={MICRO}", "train.actor_lr=1e-3", "logging.log_every=100"])


def _worker(rank, world, tmp, jobs):
    """jobs: (trainer, ring, run name); every rank runs them in order."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      LOCAL_WORLD_SIZE=str(world), HPC_RLHF_CACHE=str(Path(tmp) / "cache"))
    tmp = Path(tmp)
    walls = {}
    for trainer, ring, name in jobs:
        module = __import__(f"hpc_rlhf.recipes.{trainer}", fromlist=["run"])
        t0 = time.time()
        module.run(_cfg(tmp, trainer, ring), None, tmp / name)
        walls[name] = round(time.time() - t0, 1)
    return walls


def _history(run_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in ("step", "time_s")} for r in rows]


def _max_rel(a: list[dict], b: list[dict]) -> float:
    """Largest |a - b| / max(|a|, 1) over every metric of every logged step."""
    assert len(a) == len(b) and [r.keys() for r in a] == [r.keys() for r in b], (a, b)
    return max(abs(x[k] - y[k]) / max(abs(x[k]), 1.0) for x, y in zip(a, b) for k in x)


@pytest.fixture(scope="module")
def tmp(tmp_path_factory):
    from hpc_rlhf.data.synthetic import write_toy_datasets
    from hpc_rlhf.models.tiny import ensure_tiny_model
    tmp = tmp_path_factory.mktemp("ring_pref")
    write_toy_datasets(tmp / "data", n_train=64, n_eval=8)
    # the ranks' cache (HPC_RLHF_CACHE=tmp/cache): built here before they race to build it
    ensure_tiny_model(tmp / "cache" / "models", arch="llama")
    return tmp


@pytest.fixture(scope="module")
def runs(tmp):
    from hpc_rlhf.ring_attn import run_local_ring
    trainers = ("dpo", "rm", "kto")
    t0 = time.time()
    walls = run_local_ring(_worker, 1, (str(tmp), [(t, 1, f"{t}_base") for t in trainers]),
                           timeout_s=240)[0]
    walls |= run_local_ring(_worker, 2, (str(tmp), [*((t, 2, f"{t}_ring2") for t in trainers),
                                                    ("dpo", 1, "dpo_dp2")]), timeout_s=300)[0]
    print(f"\nrun wall s {walls}; all {time.time() - t0:.1f} s")
    return tmp


@pytest.mark.parametrize("trainer", ["dpo", "rm", "kto"])
def test_ring_size_2_matches_ring_size_1(runs, trainer):
    base = _history(runs / f"{trainer}_base")
    got = _history(runs / f"{trainer}_ring2")
    rel = _max_rel(base, got)
    print(f"\n{trainer}: loss {[round(r['loss'], 6) for r in base if 'loss' in r]}; "
          f"ring 2 vs 1 max rel diff {rel:.2e}")
    losses = [r["loss"] for r in base if "loss" in r]
    assert len(losses) == STEPS and losses[-1] != losses[0]  # it trains: not vacuous
    assert rel <= REL_TOL


def test_dpo_two_rings_of_2_match_two_data_parallel_ranks(runs):
    """4 ranks = dp 2 x ring 2 under ZeRO-3 vs dp 2 x ring 1 (and the 1-process run)."""
    from hpc_rlhf.ring_attn import run_local_ring
    walls = run_local_ring(_worker, 4, (str(runs), [("dpo", 2, "dpo_dp2_ring2")]),
                           timeout_s=300)[0]
    dp2, got = _history(runs / "dpo_dp2"), _history(runs / "dpo_dp2_ring2")
    rel, rel_base = _max_rel(dp2, got), _max_rel(_history(runs / "dpo_base"), got)
    print(f"\ndp2 x ring2 vs dp2 x ring1 max rel diff {rel:.2e} (vs 1 process {rel_base:.2e});"
          f" wall s {walls}")
    assert rel <= REL_TOL and rel_base <= REL_TOL
