"""SIGTERM alone (no SIGUSR1 first), as SLURM sends it on preemption, scancel or the time
limit: SIGCONT+SIGTERM to every process of the step (torchrun and the ranks), SIGKILL after
GraceTime / KillWait. Behaviour (hpc_rlhf/runtime/signals.py):
  - ranks that reach the next step boundary within HPC_RLHF_TERM_GRACE_S agree to stop,
    checkpoint (the watchdog is disarmed once they agreed) and exit; no REQUEUE marker outside
    a SLURM preemption (a scancel must not come back);
  - ranks that cannot (grace 0 here) hard-exit 143 at once without saving; the previous
    complete checkpoint stays and the job fails fast naming the rank.
Either way the resumed job's per-step metrics equal the uninterrupted run's."""
import os
import signal
import time

import psutil
import pytest

from rljob import (STEPS, assert_same_metrics, kill_tree, metrics, rank_failure, rank_pid,
                   root_cause, run_rl, start_rl, wait_for_step)
from testlib import scaled

from hpc_rlhf.checkpoint.store import list_checkpoints

pytestmark = pytest.mark.distributed


@pytest.mark.timeout(scaled(300))
def test_sigterm_to_every_process_checkpoints_and_resume_matches(tmp_path, reference_metrics):
    # The grace a preemptible partition would give (GraceTime 60 s); torchrun waits as long.
    proc = start_rl(tmp_path, ["checkpoint.save_every=0"], env={"HPC_RLHF_TERM_GRACE_S": "60"},
                    shutdown_timeout_s=60)
    try:
        ranks = [rank_pid(proc, r) for r in (0, 1)]
        wait_for_step(proc, tmp_path, 1)
        torchrun = psutil.Process(proc.pid)
        t_sig = time.monotonic()
        for pid in (proc.pid, *ranks):   # what slurmstepd does: every process of the step
            os.kill(pid, signal.SIGTERM)
        out, _ = proc.communicate(timeout=scaled(120))
        secs = time.monotonic() - t_sig  # from the signals to the launcher's exit
    finally:
        kill_tree(proc)
    print(f"exited {secs:.1f}s after SIGTERM, rc {proc.returncode}")
    assert not torchrun.is_running() or torchrun.status() == psutil.STATUS_ZOMBIE
    assert secs < scaled(30), secs
    ckpt = tmp_path / "checkpoints"
    saved = [s for s, _ in list_checkpoints(ckpt)]
    assert len(saved) == 1 and 1 <= saved[0] < STEPS, (saved, out[-5000:])
    k = saved[0]
    assert max(metrics(tmp_path)) == k                      # both ranks stopped after step k
    assert f"[rl] checkpointed at step {k} on a signal ['SIGTERM']; no requeue" in out, out
    assert "exiting 143" not in out                         # the watchdog never fired
    assert not (tmp_path / "REQUEUE").exists()              # scancel/preemption: SLURM decides

    rc, out, _ = run_rl(tmp_path, ["checkpoint.save_every=0"])
    assert rc == 0, out[-5000:]
    assert f"[rl] resumed from step {k} " in out, out[-5000:]
    n = assert_same_metrics(metrics(tmp_path), reference_metrics, range(k + 1, STEPS + 1))
    assert n >= 10 * (STEPS - k)


@pytest.mark.timeout(scaled(300))
def test_sigterm_without_grace_exits_fast_and_previous_checkpoint_resumes(tmp_path,
                                                                         reference_metrics):
    # Rank 1 gets SIGTERM in step 3's training with no grace to save (a step longer than the
    # scheduler's grace): it exits 143 at once; torchrun stops rank 0 the same way.
    rc, out, secs = run_rl(tmp_path, ["checkpoint.save_every=1"], fault="train:1:term:3",
                           env={"HPC_RLHF_TERM_GRACE_S": "0"})
    assert rc != 0, out[-5000:]
    # From the fault line (printed right before the rank SIGTERMs itself) to torchrun's exit.
    assert secs is not None, f"no fault-injection line: {out[-5000:]}"
    print(f"failed {secs:.1f}s after the SIGTERM")
    assert secs < scaled(30), secs
    entry = rank_failure(out, 1)   # torchrun's summary names rank 1 and its exit code
    assert "exitcode  : 143" in entry, root_cause(out)[:3000]
    assert "no checkpoint agreed within 0s" in out
    ckpt = tmp_path / "checkpoints"
    assert [s for s, _ in list_checkpoints(ckpt)] == [1, 2]
    assert max(metrics(tmp_path)) == 2 and not (tmp_path / "REQUEUE").exists()

    rc, out, _ = run_rl(tmp_path, ["checkpoint.save_every=1"])
    assert rc == 0, out[-5000:]
    assert "[rl] resumed from step 2 " in out, out[-5000:]
    assert assert_same_metrics(metrics(tmp_path), reference_metrics, range(3, STEPS + 1)) > 20
