"""Supervised trainers' checkpoint/resume with the stop-vote protocol
(runtime.StepCheckpoints), SFT, DPO, RM, KTO, KD, PRM and CSFT, 2 CPU ranks,
ZeRO-3, tiny Llama:

- an uninterrupted 4-step run;
- the same run where rank 1 alone is warned (as by SLURM's SIGUSR1) during step 2: both ranks
  stop after step 2, save checkpoint 2, rank 0 writes REQUEUE, no HF export;
- the requeued run in the same directory resumes from step 2: its steps 3-4 equal the
  uninterrupted run's (ZeRO-3 states, RNG and the data position restored).
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from distlib import ROOT, write_scored_repeat
from testlib import spawn

pytestmark = [pytest.mark.distributed, pytest.mark.deepspeed]

STEPS = 4
# trainer: (config, data file under tmp/data, overrides); KTO, KD and PRM have no config of
# their own: sft_tiny.yaml with train.trainer set, as in test_trainers_extra.py. KD's teacher
# is the tiny Qwen2 (same tokenizer, other weights).
JOBS = {
    "sft": ("sft_tiny", "sft_train.jsonl", []),
    "dpo": ("dpo_tiny", "pairs_train.jsonl", []),
    "rm": ("rm_tiny", "pairs_train.jsonl", []),
    "kto": ("sft_tiny", "kto_train.jsonl", ["train.trainer=kto", "data.label_key=label",
                                            "train.actor_lr=1e-3"]),
    "kd": ("sft_tiny", "sft_train.jsonl", ["train.trainer=kd", "train.teacher_path=tiny:qwen2"]),
    "prm": ("sft_tiny", "prm_train.jsonl", ["train.trainer=prm", "data.label_key=label",
                                            "train.actor_lr=1e-3"]),
    "csft": ("csft_tiny", "csft_train.jsonl", []),
}


def _worker(rank: int, world: int, port: int, tmp: str, trainer: str, name: str,
            warn_at: int) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                      HPC_RLHF_CACHE=str(Path(tmp) / "cache"))
    import torch
    import torch.distributed as dist
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from hpc_rlhf.config import load_config
    from hpc_rlhf.runtime import signals
    module = __import__(f"hpc_rlhf.recipes.{trainer}", fromlist=["run"])
    from hpc_rlhf.runtime import StepCheckpoints
    if warn_at and rank == 1:  # only rank 1 hears the warning, during step `warn_at`
        original = StepCheckpoints.after_step

        def after_step(self, done_steps):
            if done_steps == warn_at:
                signals.request_checkpoint()
            return original(self, done_steps)
        StepCheckpoints.after_step = after_step
    config, data, extra = JOBS[trainer]
    cfg = load_config(ROOT / "configs" / f"{config}.yaml", [
        f"data.prompts={Path(tmp) / 'data' / data}", "data.eval_prompts=",
        f"train.num_steps={STEPS}", "logging.log_every=100", "checkpoint.export_hf=true",
        *extra])
    module.run(cfg, None, Path(tmp) / name)
    dist.destroy_process_group()


def _losses(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if r["step"] > 0}


@pytest.mark.parametrize("trainer", list(JOBS))
def test_warned_rank_checkpoints_requeues_and_resume_matches(tmp_path, trainer):
    from hpc_rlhf.checkpoint.store import list_checkpoints
    from hpc_rlhf.data.synthetic import write_toy_datasets
    from hpc_rlhf.models.tiny import ensure_tiny_model
    t0 = time.time()
    write_toy_datasets(tmp_path / "data", n_train=64, n_eval=8)
    write_scored_repeat(tmp_path / "data" / "csft_train.jsonl", 64)
    for arch in ("llama", "qwen2") if trainer == "kd" else ("llama",):
        ensure_tiny_model(tmp_path / "cache" / "models", arch=arch)  # before the ranks race
    spawn(_worker, 2, (str(tmp_path), trainer, "whole", 0), 240)
    whole = _losses(tmp_path / "whole")
    assert sorted(whole) == list(range(1, STEPS + 1))   # 1-based: the state after k steps
    assert [s for s, _ in list_checkpoints(tmp_path / "whole" / "checkpoints")] == [STEPS]

    run = tmp_path / "preempted"
    spawn(_worker, 2, (str(tmp_path), trainer, "preempted", 2), 240)
    assert sorted(_losses(run)) == [1, 2]                  # both ranks stopped after step 2
    assert [s for s, _ in list_checkpoints(run / "checkpoints")] == [2]
    assert (run / "REQUEUE").exists()                      # rank 0 knew rank 1 was warned
    assert not (run / "export").exists()                       # no export of an unfinished run
    (run / "REQUEUE").unlink()                             # what the launcher does

    spawn(_worker, 2, (str(tmp_path), trainer, "preempted", 0), 240)
    resumed = _losses(run)
    assert sorted(resumed) == list(range(1, STEPS + 1))
    for step in (3, 4):
        assert resumed[step] == pytest.approx(whole[step], rel=1e-6, abs=1e-7), (step, resumed,
                                                                                 whole)
    assert resumed[1] == pytest.approx(whole[1], rel=1e-6)  # same data, same start
    assert (run / "export").is_dir() and not (run / "REQUEUE").exists()
    print(f"\n{trainer}: {time.time() - t0:.1f} s")
