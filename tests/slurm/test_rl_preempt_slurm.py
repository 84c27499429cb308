"""A real SLURM preemption of the RL job on the local cluster.

Why preemption and not `scontrol requeue` or `scancel --signal`: partition-priority preemption
(PreemptMode=REQUEUE, GraceTime=60; conftest.PREEMPT_CONF) is what a busy production cluster
does to a low-priority job: slurmctld, not the test, picks the victim, sends SIGCONT+SIGTERM to
every process of its steps (submitit's task, torchrun, the ranks; no SIGUSR1 first) and
SIGKILLs them after GraceTime. `scancel --signal` only delivers a signal, and `scontrol requeue`
of a running job kills it after KillWait (2 s here) with no grace to save.

Trap this test pins (SLURM 22.05): a preempted job that checkpoints and exits inside GraceTime
ends COMPLETED and is NOT requeued by SLURM. So rank 0 asks `scontrol show job` whether the job
was preempted (PreemptTime set) and writes REQUEUE; submitit's task then runs
`scontrol requeue` (hpc_rlhf/runtime/signals.py, hpc_rlhf/launch/submit.py).

The job: configs/grpo_tiny.yaml on 1 node x 2 ranks (HF engine, DeepSpeed ZeRO-3, gloo), the
fault suite's settings, so its metrics must equal an uninterrupted local run's."""
import re
import subprocess
import sys
import time

import pytest

from rljob import GRPO, RL_OVERRIDES, assert_same_metrics, metrics, run_rl
from testlib import REPO, scaled, wait_until

pytestmark = [pytest.mark.slurm, pytest.mark.distributed, pytest.mark.deepspeed]
STEPS = 12  # ~1-3 s each: the preemption must land mid-run
OVERRIDES = [*(o for o in RL_OVERRIDES if not o.startswith("train.num_steps=")),
             f"train.num_steps={STEPS}", "checkpoint.save_every=0"]


@pytest.mark.timeout(scaled(400))
def test_preempted_rl_job_checkpoints_is_requeued_and_matches_uninterrupted(slurm_cluster,
                                                                            tmp_path):
    rc, out, _ = run_rl(tmp_path / "reference", OVERRIDES)  # later overrides win
    assert rc == 0, out[-5000:]
    reference = metrics(tmp_path / "reference")

    run = tmp_path / "run"
    argv = [sys.executable, "-m", "hpc_rlhf.submit", "--config", GRPO, *OVERRIDES,
            "topology.backend=gloo", f"launch.run_dir={run}",
            "launch.partition=low"]
    # The ranks' SIGTERM grace must fit in the partition's GraceTime (60 s) with the save.
    env = slurm_cluster.env(HPC_RLHF_TERM_GRACE_S="40", OMP_NUM_THREADS="1")
    out = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=scaled(60))
    assert out.returncode == 0, out.stdout + out.stderr
    job = out.stdout.split("[submit] submitted job ")[1].split(":")[0]
    logs = lambda: "\n".join(p.read_text() for p in sorted((run / "submitit").glob("*.out")))
    wait_until(lambda: 1 in metrics(run), 120, f"step 1 of job {job}")

    # A high-priority job that needs both whole nodes: slurmctld preempts the RL job.
    t_preempt = time.monotonic()
    out = subprocess.run(["sbatch", "--parsable", "-p", "high", "--nodes=2", "--exclusive",
                          f"--output={tmp_path}/high.out", "--wrap", "sleep 1"],
                         env=slurm_cluster.env(), capture_output=True, text=True, timeout=scaled(30))
    assert out.returncode == 0, out.stdout + out.stderr
    high = out.stdout.strip().split(";")[0]
    info = slurm_cluster.wait(job, timeout=240, restarts=1)
    text = logs()
    assert (info["JobState"], info["Restarts"]) == ("COMPLETED", "1"), (info, text[-5000:])
    assert slurm_cluster.job(high)["JobState"] == "COMPLETED"
    print(f"preempted, requeued and finished {time.monotonic() - t_preempt:.0f}s after the "
          "high-priority job was submitted")

    # Rank 0 got SIGTERM only (no SIGUSR1/USR2 first) and still asked for the requeue.
    found = re.search(r"\[rl\] checkpointed at step (\d+) on a signal \['SIGTERM'\]; "
                      r"requeue requested", text)
    assert found, text[-5000:]
    k = int(found.group(1))
    assert 1 <= k < STEPS, k
    assert f"requeueing job {job}" in text, text[-5000:]
    assert f"[rl] resumed from step {k} " in text, text[-5000:]
    n = assert_same_metrics(metrics(run), reference, range(k + 1, STEPS + 1))
    assert n >= 10 * (STEPS - k)
    assert not (run / "REQUEUE").exists()
