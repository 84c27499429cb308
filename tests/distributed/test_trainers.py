"""End to end: SFT, RM and DPO on the tiny Llama, 2 CPU ranks (gloo), DeepSpeed ZeRO-3.

One spawned pair of processes runs all three recipes through their `run(cfg, topo, run_dir)`
entry (configs/*_tiny.yaml + overrides); the tests then read each run's metrics.jsonl.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from distlib import ROOT, read_metrics
from testlib import spawn

pytestmark = [pytest.mark.distributed, pytest.mark.deepspeed]

TRAINERS = ("sft", "rm", "dpo")
TIMEOUT_S = 240


def _worker(rank: int, world: int, port: int, tmp: str, trainers: tuple[str, ...]) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import torch
    import torch.distributed as dist
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from hpc_rlhf.config import load_config
    data = Path(tmp) / "data"
    for name in trainers:
        module = __import__(f"hpc_rlhf.recipes.{name}", fromlist=["run"])
        kind = "sft" if name == "sft" else "pairs"
        cfg = load_config(ROOT / "configs" / f"{name}_tiny.yaml", [
            f"data.prompts={data / f'{kind}_train.jsonl'}",
            f"data.eval_prompts={data / f'{kind}_eval.jsonl'}", "logging.log_every=100"])
        t0 = time.time()
        module.run(cfg, None, Path(tmp) / name)
        if rank == 0:
            (Path(tmp) / name / "wall_s").write_text(f"{time.time() - t0:.1f}")
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from hpc_rlhf.data.synthetic import write_toy_datasets
    from hpc_rlhf.models.resolve import cache_dir
    from hpc_rlhf.models.tiny import ensure_tiny_model
    tmp = tmp_path_factory.mktemp("trainers")
    write_toy_datasets(tmp / "data", n_train=128, n_eval=32)
    # A private model cache (the ranks inherit it): other tests may rebuild the shared one.
    old = os.environ.get("HPC_RLHF_CACHE")
    os.environ["HPC_RLHF_CACHE"] = str(tmp / "cache")
    try:
        ensure_tiny_model(cache_dir() / "models", arch="llama")  # built before the ranks race
        t0 = time.time()
        spawn(_worker, 2, (str(tmp), TRAINERS), TIMEOUT_S)
    finally:
        if old is None:
            os.environ.pop("HPC_RLHF_CACHE", None)
        else:
            os.environ["HPC_RLHF_CACHE"] = old
    print(f"\nsft+rm+dpo on 2 ranks: {time.time() - t0:.1f} s")
    return tmp



def _report(name: str, rows: list[dict], run_dir: Path) -> None:
    print(f"{name} ({(run_dir / 'wall_s').read_text()} s): first {rows[0]} last {rows[-1]}")


def test_sft_loss_falls(runs):
    rows = read_metrics(runs / "sft")
    _report("sft", rows, runs / "sft")
    train = [r["loss"] for r in rows if r["step"] > 0]
    assert train[-1] < 0.6 * train[0], train
    assert rows[-1]["eval_loss"] < 0.6 * rows[0]["eval_loss"], (rows[0], rows[-1])


def test_rm_ranks_heldout_pairs(runs):
    rows = read_metrics(runs / "rm")
    _report("rm", rows, runs / "rm")
    train = [r["loss"] for r in rows if r["step"] > 0]
    assert sum(train[-3:]) / 3 < sum(train[:3]) / 3, train
    assert rows[-1]["eval_accuracy"] >= 0.75, rows[-1]     # 32 held-out pairs; chance = 0.5
    assert rows[-1]["eval_score_gap"] > rows[0]["eval_score_gap"]


def test_dpo_raises_margin(runs):
    rows = read_metrics(runs / "dpo")
    _report("dpo", rows, runs / "dpo")
    train = [r["loss"] for r in rows if r["step"] > 0]
    assert abs(rows[0]["eval_reward_margin"]) < 1e-5       # policy == reference at the start
    assert rows[-1]["eval_reward_margin"] > 0.5, rows[-1]
    assert rows[-1]["eval_logp_margin"] > rows[0]["eval_logp_margin"] + 5.0
    assert train[-1] < train[0], train
