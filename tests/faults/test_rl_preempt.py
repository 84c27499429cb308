"""Cases 2 and 3: SIGUSR1 (SLURM's warning before the time limit / preemption) delivered to ONE
rank of a running RL job: all ranks stop at the same step, checkpoint, rank 0 writes REQUEUE,
the job exits 0. The requeued job, whose newest checkpoint is incomplete (a step dir without
COMPLETE and a .tmp- dir, as a killed save leaves them), resumes from the newest complete one
and its per-step metrics equal an uninterrupted run's (every non-timing metric within rel 1e-5 /
abs 1e-6: ZeRO-3 states, RNG and the prompt cursor are restored)."""
import os
import shutil
import signal
import time

import pytest

from rljob import (STEPS, assert_same_metrics, kill_tree, metrics, rank_pid, run_rl, start_rl,
                   wait_for_step)
from testlib import scaled

from hpc_rlhf.checkpoint.store import MARKER, list_checkpoints, step_dir_name

pytestmark = pytest.mark.distributed


@pytest.mark.timeout(scaled(300))
def test_sigusr1_checkpoints_requeues_and_resume_matches_uninterrupted(tmp_path,
                                                                      reference_metrics):
    proc = start_rl(tmp_path, ["checkpoint.save_every=0"])
    try:
        rank1 = rank_pid(proc, 1)
        wait_for_step(proc, tmp_path, 1)
        t_sig = time.monotonic()
        os.kill(rank1, signal.SIGUSR1)      # only rank 1 hears it; rank 0 must follow
        out, _ = proc.communicate(timeout=scaled(120))
        secs = time.monotonic() - t_sig     # from the signal to the launcher's exit
    finally:
        kill_tree(proc)
    assert proc.returncode == 0, out[-5000:]
    assert secs < scaled(30), secs
    assert (tmp_path / "REQUEUE").exists()
    ckpt = tmp_path / "checkpoints"
    saved = [s for s, _ in list_checkpoints(ckpt)]
    assert len(saved) == 1 and 1 <= saved[0] < STEPS, saved   # save_every=0: only the signal's
    k = saved[0]
    assert f"[rl] checkpointed at step {k} on a signal" in out
    assert max(metrics(tmp_path)) == k                        # both ranks stopped after step k
    assert "signals received: ['SIGUSR1']" in out

    # Case 3: the newest checkpoint on disk is incomplete (no COMPLETE marker), and a killed
    # save left a temp dir. The requeued job must skip both.
    broken = ckpt / step_dir_name(k + 1)
    shutil.copytree(ckpt / step_dir_name(k), broken)
    (broken / MARKER).unlink()
    shutil.copytree(ckpt / step_dir_name(k), ckpt / f".tmp-{step_dir_name(k + 2)}")
    (tmp_path / "REQUEUE").unlink()

    rc, out, _ = run_rl(tmp_path, ["checkpoint.save_every=0"])
    assert rc == 0, out[-5000:]
    assert f"[rl] resumed from step {k} " in out, out[-5000:]
    assert not (tmp_path / "REQUEUE").exists()
    n = assert_same_metrics(metrics(tmp_path), reference_metrics, range(k + 1, STEPS + 1))
    assert n >= 10 * (STEPS - k)
    assert [s for s, _ in list_checkpoints(ckpt)][-1] == STEPS
