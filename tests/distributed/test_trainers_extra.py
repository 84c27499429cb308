"""End to end: KTO, PRM and KD (teacher = an SFT run exported to HF) on the tiny Llama,
2 CPU ranks, ZeRO-3; one spawned pair of processes runs all four recipes."""
from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from distlib import ROOT, read_metrics
from testlib import spawn

pytestmark = [pytest.mark.distributed, pytest.mark.deepspeed]
TIMEOUT_S = 240


def _worker(rank: int, world: int, port: int, tmp: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import torch
    import torch.distributed as dist
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from hpc_rlhf.config import load_config
    data, tmp = Path(tmp) / "data", Path(tmp)
    jobs = [  # (trainer, data kind, overrides)
        ("sft", "sft", ["checkpoint.export_hf=true", "train.num_steps=6"]),
        ("kto", "kto", ["train.actor_lr=1e-3", "train.num_steps=12"]),
        ("prm", "prm", ["train.actor_lr=1e-3", "train.num_steps=30"]),
        ("kd", "sft", [f"train.teacher_path={tmp / 'sft' / 'export'}", "train.num_steps=10"]),
    ]
    for name, kind, extra in jobs:
        module = __import__(f"hpc_rlhf.recipes.{name}", fromlist=["run"])
        cfg = load_config(ROOT / "configs" / "sft_tiny.yaml", [
            f"train.trainer={name}", f"data.prompts={data / f'{kind}_train.jsonl'}",
            f"data.eval_prompts={data / f'{kind}_eval.jsonl'}", "logging.log_every=100",
            "data.label_key=label", *extra])
        t0 = time.time()
        module.run(cfg, None, tmp / name)
        if rank == 0:
            (tmp / name / "wall_s").write_text(f"{time.time() - t0:.1f}")
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from hpc_rlhf.data.synthetic import write_toy_datasets
    from hpc_rlhf.models.resolve import cache_dir
    from hpc_rlhf.models.tiny import ensure_tiny_model
    tmp = tmp_path_factory.mktemp("trainers_extra")
    write_toy_datasets(tmp / "data", n_train=128, n_eval=32)
    old = os.environ.get("HPC_RLHF_CACHE")
    os.environ["HPC_RLHF_CACHE"] = str(tmp / "cache")
    try:
        ensure_tiny_model(cache_dir() / "models", arch="llama")
        t0 = time.time()
        spawn(_worker, 2, (str(tmp),), TIMEOUT_S)
        print(f"\nsft+kto+prm+kd on 2 ranks: {time.time() - t0:.1f} s")
    finally:
        if old is None:
            os.environ.pop("HPC_RLHF_CACHE", None)
        else:
            os.environ["HPC_RLHF_CACHE"] = old
    return tmp


def _show(name, runs):
    rows = read_metrics(runs / name)
    print(f"{name} ({(runs / name / 'wall_s').read_text()} s): first {rows[0]} last {rows[-1]}")
    return rows


def test_kto_separates_desirable(runs):
    rows = _show("kto", runs)
    assert abs(rows[0]["eval_reward_gap"]) < 1e-5          # policy == reference at the start
    assert rows[-1]["eval_reward_gap"] > 1.0, rows[-1]
    train = [r["loss"] for r in rows if r["step"] > 0]
    assert train[-1] < train[0], train


def test_prm_step_accuracy_rises(runs):
    rows = _show("prm", runs)
    assert rows[-1]["eval_step_accuracy"] >= 0.85, rows[-1]   # 70 % of steps are good
    assert rows[-1]["eval_step_accuracy"] > rows[0]["eval_step_accuracy"]


def test_kd_student_approaches_teacher(runs):
    assert (runs / "sft" / "export" / "config.json").exists()       # the HF export is loadable
    rows = _show("kd", runs)
    assert rows[-1]["eval_kl"] < 0.5 * rows[0]["eval_kl"], (rows[0], rows[-1])
