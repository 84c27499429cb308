"""The SIGTERM watchdog of hpc_rlhf/launch/signals.py in a real process: SIGTERM arms a hard
exit (143, stacks on stderr) that `stop_agreed()` disarms; only warning signals (USR1/USR2) or
a SLURM preemption make `request_requeue` write the REQUEUE marker."""
import os
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.unit

SCRIPT = textwrap.dedent("""
    import os, signal, sys, time
    from hpc_rlhf.launch import signals
    signals.install(grace_s=float(sys.argv[1]))
    for name in sys.argv[3].split(","):
        os.kill(os.getpid(), getattr(signal, name))
    time.sleep(0.3)                    # the main thread is busy: the watchdog runs meanwhile
    assert signals.checkpoint_requested()
    print("vote", signals.stop_vote(), flush=True)
    if sys.argv[2].startswith("agree"):  # "agree2": another rank was warned (MAX vote 2)
        signals.stop_agreed(int(sys.argv[2][5:] or signals.stop_vote()))
    time.sleep(1.5)                    # longer than the grace: the save
    marker = signals.request_requeue(sys.argv[4])
    print("requeue", marker is not None, signals.received_signals(), flush=True)
""")


def _run(tmp_path, grace, agree, sigs):
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}  # not in a job
    return subprocess.run([sys.executable, "-c", SCRIPT, str(grace), agree, sigs, str(tmp_path)],
                          capture_output=True, text=True, timeout=60, env=env)


def test_sigterm_without_agreement_hard_exits_after_the_grace(tmp_path):
    out = _run(tmp_path, 1.0, "no", "SIGTERM")
    assert out.returncode == 143, out.stdout + out.stderr
    assert "no checkpoint agreed within 1s" in out.stderr and "Thread" in out.stderr
    assert "requeue" not in out.stdout


def test_stop_agreed_disarms_the_watchdog_and_sigterm_alone_does_not_requeue(tmp_path):
    out = _run(tmp_path, 1.0, "agree", "SIGTERM,SIGTERM")   # SLURM's and torchrun's copy
    assert out.returncode == 0, out.stdout + out.stderr
    assert "vote 1" in out.stdout
    assert "requeue False ['SIGTERM']" in out.stdout         # no SLURM_JOB_ID: not preempted
    assert not (tmp_path / "REQUEUE").exists()


def test_warning_signal_then_sigterm_requeues(tmp_path):
    out = _run(tmp_path, 1.0, "agree", "SIGUSR1,SIGTERM")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "vote 2" in out.stdout and "requeue True ['SIGUSR1', 'SIGTERM']" in out.stdout
    assert (tmp_path / "REQUEUE").exists()


def test_rank0_requeues_when_another_rank_was_warned(tmp_path):
    # Rank 0 saw only SIGTERM, but the agreed (MAX) vote says some rank got SIGUSR1.
    out = _run(tmp_path, 1.0, "agree2", "SIGTERM")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "vote 1" in out.stdout and "requeue True ['SIGTERM']" in out.stdout


def test_grace_zero_exits_at_once(tmp_path):
    out = _run(tmp_path, 0.0, "agree", "SIGTERM")            # agreement comes too late
    assert out.returncode == 143, out.stdout + out.stderr
