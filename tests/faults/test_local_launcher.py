"""The local launcher as a user meets it (`python -m hpc_rlhf.submit --local`, the real RL job
on 2 ranks): Ctrl-C checkpoints and exits cleanly, a rerun resumes and logs each step once, a
finished run is not retrained, a changed config is refused, killing the launcher leaves no
process behind, and a failing rank ends with one line naming it."""
import signal
import subprocess
import sys
import time

import psutil
import pytest

from rljob import GRPO, RL_OVERRIDES, STEPS, metrics, rl_env, wait_for_step
from testlib import REPO, TimedOutput, scaled, wait_until

from hpc_rlhf.checkpoint.store import list_checkpoints

pytestmark = pytest.mark.distributed


def _launch(run_dir, overrides=(), env=None) -> subprocess.Popen:
    argv = [sys.executable, "-m", "hpc_rlhf.submit", "--config", GRPO, "--local",
            *RL_OVERRIDES, *overrides]
    # A step of this job can take a few seconds on a loaded machine: the grace must cover one.
    return subprocess.Popen(argv, cwd=REPO, env={**rl_env(run_dir), "HPC_RLHF_TERM_GRACE_S":
                                                 str(scaled(60)), **(env or {})},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _job_processes(proc) -> list:
    """The launcher's descendants (torchrun and the ranks), once the ranks are up."""
    def ranks():
        kids = psutil.Process(proc.pid).children(recursive=True)
        n = sum(1 for k in kids if _env(k).get("RANK") in ("0", "1"))
        return kids if n == 2 else None
    return wait_until(ranks, 120, "torchrun and 2 ranks to start")


def _env(p) -> dict:
    try:
        return p.environ()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return {}


def _assert_gone(procs, within_s: float) -> None:
    _, alive = psutil.wait_procs(procs, timeout=scaled(within_s))
    assert not alive, f"still running {within_s} s later: {[p.pid for p in alive]}"


def _run(run_dir, overrides=(), timeout=300) -> tuple[int, str]:
    proc = _launch(run_dir, overrides)
    out = TimedOutput(proc)
    rc, _ = out.wait(timeout)
    return rc, out.text


@pytest.mark.timeout(scaled(900))
def test_ctrl_c_checkpoints_then_resume_finish_and_refuse_a_changed_config(tmp_path):
    proc = _launch(tmp_path)
    job = _job_processes(proc)
    wait_for_step(proc, tmp_path, 2)
    proc.send_signal(signal.SIGINT)                      # Ctrl-C
    out = TimedOutput(proc)
    rc, _ = out.wait(120)
    text = out.text
    assert rc == 128 + signal.SIGINT, text[-5000:]
    everything = (tmp_path / "logs" / "console.log").read_text()   # unfiltered output
    assert "KeyboardInterrupt" not in everything and "Traceback" not in everything, everything
    stopped = max(metrics(tmp_path))
    assert 2 <= stopped < STEPS, text[-3000:]
    assert f"checkpointed at step {stopped} on a signal" in text, text[-3000:]
    assert "rerun the same command to resume" in text
    assert [s for s, _ in list_checkpoints(tmp_path / "checkpoints")][-1] == stopped
    _assert_gone(job, 10)

    rc, text = _run(tmp_path)                            # the rerun resumes and finishes
    assert rc == 0, text[-5000:]
    assert f"[rl] resumed from step {stopped}" in text, text[-3000:]
    assert sorted(metrics(tmp_path)) == list(range(1, STEPS + 1))   # each step once (metrics())

    rows = (tmp_path / "metrics.jsonl").read_text()
    rc, text = _run(tmp_path)                            # finished: nothing to train
    assert rc == 0, text[-5000:]
    assert "already finished" in text and "torchrun" not in text, text[-3000:]
    assert (tmp_path / "metrics.jsonl").read_text() == rows

    rc, text = _run(tmp_path, ["train.actor_lr=1e-3"])  # a changed config is refused
    assert rc == 2, text[-3000:]
    assert "train.actor_lr" in text and "checkpoint.resume_from=" in text, text
    assert "launch.name=" in text
    assert (tmp_path / "metrics.jsonl").read_text() == rows


@pytest.mark.timeout(scaled(300))
def test_killing_the_launcher_leaves_no_process_of_the_job(tmp_path):
    proc = _launch(tmp_path, ["train.num_steps=50"])
    job = _job_processes(proc)
    wait_for_step(proc, tmp_path, 1)
    proc.kill()                                          # SIGKILL: no handler runs here
    proc.wait(timeout=30)
    _assert_gone(job, 10)


@pytest.mark.timeout(scaled(300))
def test_a_failing_rank_ends_with_one_line_naming_it(tmp_path):
    proc = _launch(tmp_path, env={"HPC_RLHF_FAULT": "train:1:raise:2"})
    out = TimedOutput(proc)
    rc, _ = out.wait(240)
    assert rc != 0
    last = out.text.strip().splitlines()[-1]
    assert last.startswith("[submit] FAILED on rank 1: FaultInjected: [rank 1] HPC_RLHF_FAULT: "
                           "injecting raise in train"), out.text[-3000:]
    assert f"full log: {tmp_path / 'logs' / 'rank1.log'}" in last
    assert "FaultInjected" in (tmp_path / "logs" / "rank1.log").read_text()


@pytest.mark.timeout(scaled(300))
def test_an_unreachable_reward_server_ends_the_job_before_any_model_loads(tmp_path):
    import socket
    with socket.socket() as s:  # a port nobody listens on: bound, never listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        proc = _launch(tmp_path, ["reward.source=remote", "reward.remote_timeout_s=2",
                                  f"reward.remote_url=http://127.0.0.1:{port}/score"])
        out = TimedOutput(proc)
        rc, _ = out.wait(240)
    assert rc == 1, out.text[-3000:]
    last = out.text.strip().splitlines()[-1]
    assert last.startswith(f"[submit] FAILED on rank 0: RewardError: reward.remote_url: no "
                           f"connection within 2 s to http://127.0.0.1:{port}/score"), last
    log = (tmp_path / "logs" / "rank0.log").read_text()
    assert "nothing was loaded yet" in log and "(in probe_servers, remote.py" in last
    assert "hpc_rlhf/algos/" not in log, log[-2000:]  # the RL program never started


def _jobs(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hpc_rlhf.submit", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=scaled(60))


@pytest.mark.timeout(scaled(600))
def test_status_logs_and_cancel_of_a_local_run(tmp_path):
    proc = _launch(tmp_path, ["train.num_steps=50"])
    job = _job_processes(proc)
    wait_for_step(proc, tmp_path, 1)
    out = _jobs("status", str(tmp_path))
    assert out.returncode == 0, out.stderr
    assert f"state: running on this machine (launcher pid {proc.pid})" in out.stdout, out.stdout
    assert "rl (grpo), model tiny:llama, 50 steps" in out.stdout
    assert "last metrics (step " in out.stdout and "reward/mean=" in out.stdout
    log = _jobs("logs", str(tmp_path), "-n", "5")
    assert log.returncode == 0 and log.stdout.startswith(f"==> {tmp_path / 'logs' / 'console.log'}")
    cancel = _jobs("cancel", str(tmp_path))
    assert cancel.returncode == 0 and f"launcher pid {proc.pid}" in cancel.stdout, cancel.stderr
    rc, _ = TimedOutput(proc).wait(120)
    assert rc == 128 + signal.SIGTERM
    _assert_gone(job, 10)
    stopped = list_checkpoints(tmp_path / "checkpoints")[-1][0]
    out = _jobs("status", str(tmp_path))
    assert f"state: stopped: checkpoint at step {stopped} of 50; rerun the same command" in \
        out.stdout, out.stdout
    again = _jobs("cancel", str(tmp_path))
    assert again.returncode == 1 and "nothing is running" in again.stderr
