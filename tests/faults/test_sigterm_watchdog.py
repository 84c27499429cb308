"""The SIGTERM watchdog of hpc_rlhf/runtime/signals.py in a real process: SIGTERM arms a hard
exit (143, stacks on stderr) that `stop_agreed()` disarms; only warning signals (USR1/USR2) or
a SLURM preemption make `request_requeue` write the REQUEUE marker."""
import os
import subprocess
import sys
import textwrap

import pytest

from testlib import scaled

pytestmark = pytest.mark.unit

SCRIPT = textwrap.dedent("""
    import os, signal, sys, time
    from hpc_rlhf.runtime import signals
    signals.install(grace_s=float(sys.argv[1]))
    names = sys.argv[3].split(",")
    for name in names:
        os.kill(os.getpid(), getattr(signal, name))
    # The main thread stays busy while the watchdog thread reads the wakeup fd and, on SIGTERM,
    # arms its hard-exit timer: wait for that state itself (signals._state: no public hook
    # says "armed"), not for a guessed time.
    while not (signals.checkpoint_requested()
               and ("SIGTERM" not in names or signals._state["timer"] is not None)):
        time.sleep(0.005)
    print("vote", signals.stop_vote(), flush=True)
    timer = signals._state["timer"]
    if sys.argv[2].startswith("agree"):  # "agree2": another rank was warned (MAX vote 2)
        signals.stop_agreed(int(sys.argv[2][5:] or signals.stop_vote()))
    # The save, longer than the grace: the armed timer's thread ends either by the hard exit
    # (this process dies with 143) or, once stop_agreed() cancelled it, without firing.
    if timer is not None:
        timer.join()
    marker = signals.request_requeue(sys.argv[4])
    print("requeue", marker is not None, signals.received_signals(), flush=True)
""")
# Agreement comes at once after the watchdog armed, but on a loaded machine "at once" can take
# a while: give it a grace no stall reaches. Without agreement the grace is waited out for real.
AGREE_GRACE_S = 60.0


def _run(tmp_path, grace, agree, sigs):
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}  # not in a job
    return subprocess.run([sys.executable, "-c", SCRIPT, str(grace), agree, sigs, str(tmp_path)],
                          capture_output=True, text=True, timeout=scaled(60) + grace, env=env)


def test_sigterm_without_agreement_hard_exits_after_the_grace(tmp_path):
    out = _run(tmp_path, 1.0, "no", "SIGTERM")
    assert out.returncode == 143, out.stdout + out.stderr
    assert "no checkpoint agreed within 1s" in out.stderr and "Thread" in out.stderr
    assert "requeue" not in out.stdout


def test_stop_agreed_disarms_the_watchdog_and_sigterm_alone_does_not_requeue(tmp_path):
    # SLURM's and torchrun's copy of the signal
    out = _run(tmp_path, AGREE_GRACE_S, "agree", "SIGTERM,SIGTERM")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "vote 1" in out.stdout
    assert "requeue False ['SIGTERM']" in out.stdout         # no SLURM_JOB_ID: not preempted
    assert not (tmp_path / "REQUEUE").exists()


def test_warning_signal_then_sigterm_requeues(tmp_path):
    out = _run(tmp_path, AGREE_GRACE_S, "agree", "SIGUSR1,SIGTERM")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "vote 2" in out.stdout and "requeue True ['SIGUSR1', 'SIGTERM']" in out.stdout
    assert (tmp_path / "REQUEUE").exists()


def test_rank0_requeues_when_another_rank_was_warned(tmp_path):
    # Rank 0 saw only SIGTERM, but the agreed (MAX) vote says some rank got SIGUSR1.
    out = _run(tmp_path, AGREE_GRACE_S, "agree2", "SIGTERM")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "vote 1" in out.stdout and "requeue True ['SIGTERM']" in out.stdout


def test_grace_zero_exits_at_once(tmp_path):
    out = _run(tmp_path, 0.0, "late", "SIGTERM")             # no time to agree at all
    assert out.returncode == 143, out.stdout + out.stderr
    assert "no checkpoint agreed within 0s" in out.stderr and "requeue" not in out.stdout
