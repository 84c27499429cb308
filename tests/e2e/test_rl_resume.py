"""Resume: a run stopped at a checkpoint and restarted continues exactly as if uninterrupted.

The uninterrupted GRPO run A (4 steps, HF engine: `grpo_hf_reference`) is the reference. B
stops after 2 steps (its final checkpoint); rerunning it with num_steps=4 is refused (a changed
config on a checkpointed run), and a new run B2 branched from it with checkpoint.resume_from
continues it. S gets SIGUSR1 mid-run, must checkpoint, write REQUEUE and exit 0, and is then
rerun, as the requeued job would be, to completion. Rollout seeds depend only on (train.seed, step, rank) and the micro-batch
shuffle on (seed, step), so the resumed steps must reproduce A's rewards and losses.
The HF engine follows the same seeded-sampling contract as vLLM and starts ~15 s faster.
"""
import os
import signal
import time

import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.deepspeed]

COMPARED = ("reward/mean", "loss/policy", "policy/entropy", "rollout/response_len")
# Observed: bit-identical (difference 0.0) on CPU; the tolerance only allows reordered
# float32 reductions. A resume that lost the optimizer state or the prompt cursor is off by
# > 1e-3 in loss/policy and usually in reward/mean.
TOL = 1e-6


def by_step(metrics):
    return {m["step"]: m for m in metrics}


def assert_same_steps(got, want, steps):
    for step in steps:
        for key in COMPARED:
            assert got[step][key] == pytest.approx(want[step][key], abs=TOL), (
                f"step {step} {key}: resumed {got[step][key]!r} vs uninterrupted "
                f"{want[step][key]!r}")


def test_branch_from_final_checkpoint_matches_uninterrupted(grpo_hf_reference, tmp_path,
                                                            rl_job, start_rl_job):
    ref = grpo_hf_reference
    run_dir = tmp_path / "B"
    first = rl_job(run_dir, [*ref.overrides, "train.num_steps=2"])
    assert [m["step"] for m in first.metrics] == [1, 2]
    more = [*ref.overrides, f"train.num_steps={ref.steps}"]
    refused = start_rl_job(run_dir, more, log_name="refused.log")
    assert refused.wait(120) == 2, refused.tail()
    text = refused.log.read_text()
    assert "train.num_steps: 2 -> 4" in text and "checkpoint.resume_from=" in text, text
    branch = tmp_path / "B2"
    resumed = rl_job(branch, [*more, f"checkpoint.resume_from={run_dir}"])
    assert f"branched from {run_dir / 'checkpoints' / 'step_00000002'}" in resumed.log.read_text()
    got = by_step(resumed.metrics)
    assert sorted(got) == list(range(3, ref.steps + 1))   # the branch logs its own steps
    assert_same_steps(got, ref.by_step(), range(3, ref.steps + 1))
    assert [m["step"] for m in first.metrics] == [1, 2]   # the original run is untouched


def test_sigusr1_checkpoints_requeues_and_resumes(grpo_hf_reference, tmp_path, rl_job,
                                                  start_rl_job):
    ref = grpo_hf_reference
    run_dir = tmp_path / "S"
    # More steps than the reference, so a signal sent after step 1 always lands before the
    # end; the learning-rate schedule is constant, so num_steps does not change the updates.
    job = start_rl_job(run_dir, [*ref.overrides, f"train.num_steps={2 * ref.steps}"])
    deadline = time.monotonic() + 240
    while not job.metrics and job.proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert job.metrics, f"no step finished before the deadline or exit\n{job.tail()}"
    os.kill(job.proc.pid, signal.SIGUSR1)
    assert job.wait(240) == 0, job.tail()
    stopped_at = job.metrics[-1]["step"]
    assert 1 <= stopped_at < ref.steps, (f"SIGUSR1 sent after step 1 was acted on only after "
                                         f"step {stopped_at}\n{job.tail()}")
    assert (run_dir / "REQUEUE").exists()
    assert f"checkpointed at step {stopped_at} on a signal" in job.log.read_text()
    assert any((run_dir / "checkpoints").iterdir())

    (run_dir / "REQUEUE").unlink()   # the batch script removes it when it requeues
    resumed = rl_job(run_dir, [*ref.overrides, f"train.num_steps={2 * ref.steps}"],
                     log_name="resume.log")   # the requeued job: the same config
    assert f"resumed from step {stopped_at}" in resumed.log.read_text()
    got = by_step(resumed.metrics)
    assert sorted(got) == list(range(1, 2 * ref.steps + 1))   # each step once
    assert_same_steps(got, ref.by_step(), range(1, ref.steps + 1))
    assert not (run_dir / "REQUEUE").exists()
