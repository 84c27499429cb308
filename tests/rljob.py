"""The real RL job of the fault and SLURM suites (torchrun, gloo, 2 colocated ranks, HF rollout
engine, tiny Llama): start it, find its rank processes, wait for metrics, compare metrics.
A helper module of tests/ (on sys.path: the root conftest lives there), so tests/faults and
tests/slurm import it alike."""
from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import psutil

from testlib import REPO, TORCHRUN_ENDPOINT, TimedOutput, scaled

from hpc_rlhf.launch.plan import torchrun_argv

GRPO = str(REPO / "configs" / "grpo_tiny.yaml")
STEPS = 5
# grpo_tiny with the HF engine on 2 colocated ranks; every run of the suite uses these, so the
# reference run's metrics are comparable with every resumed run's.
RL_OVERRIDES = ["rollout.engine=hf", "topology.procs_per_node=2", f"train.num_steps={STEPS}",
                "logging.tensorboard=false", "topology.timeout_s=30"]
# Metrics that depend on wall time or the process's memory history, not on the computation.
TIMING_PREFIXES = ("time/", "throughput/", "memory/")
REL_TOL, ABS_TOL = 1e-5, 1e-6


def rl_argv(overrides: list[str], shutdown_timeout_s: int = 10) -> list[str]:
    # c10d on port 0: torchrun binds a free port itself (no port found now and bound later).
    return torchrun_argv(GRPO, [*RL_OVERRIDES, *overrides], 1, 2, TORCHRUN_ENDPOINT, "faults",
                         shutdown_timeout_s)


def rl_env(run_dir: Path, fault: str = "") -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT",
                        "HPC_RLHF_FAULT", "HPC_RLHF_PROGRAM")}
    env.update(HPC_RLHF_RUN_DIR=str(run_dir), OMP_NUM_THREADS="1", HPC_RLHF_TERM_GRACE_S="3",
               PYTHONUNBUFFERED="1")
    if fault:
        env["HPC_RLHF_FAULT"] = fault
    return env


def start_rl(run_dir: Path, overrides: list[str] = (), fault: str = "", env: dict | None = None,
             shutdown_timeout_s: int = 10) -> subprocess.Popen:
    return subprocess.Popen(rl_argv(list(overrides), shutdown_timeout_s), cwd=REPO,
                            env={**rl_env(run_dir, fault), **(env or {})},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def run_rl(run_dir: Path, overrides: list[str] = (), fault: str = "", timeout: float = 240,
           env: dict | None = None) -> tuple[int, str, float | None]:
    """(exit code, output, seconds from the fault-injection line to the launcher's exit: None
    when no fault was injected) of one whole job; fails past scaled(timeout)."""
    proc = start_rl(run_dir, overrides, fault, env)
    out = TimedOutput(proc)
    try:
        rc, t_exit = out.wait(timeout)
    finally:
        kill_tree(proc)
    t_fault = out.first("HPC_RLHF_FAULT: injecting")   # hpc_rlhf/faults.py prints it
    return rc, out.text, None if t_fault is None else t_exit - t_fault


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL a launcher and its ranks if still alive (only the processes this test started)."""
    if proc.poll() is not None:
        return
    try:
        children = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        children = []
    for p in [*children]:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    proc.kill()
    proc.wait(timeout=30)


def rank_pid(proc: subprocess.Popen, rank: int, timeout: float = 60) -> int:
    """pid of global rank `rank` among the launcher's children (read from their RANK env)."""
    deadline = time.monotonic() + scaled(timeout)
    while time.monotonic() < deadline:
        for child in psutil.Process(proc.pid).children(recursive=True):
            try:
                if child.environ().get("RANK") == str(rank):
                    return child.pid
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        time.sleep(0.2)
    raise TimeoutError(f"rank {rank} never started")


def metrics(run_dir: Path) -> dict[int, dict]:
    """step -> metrics. A resumed run drops what the killed attempt logged past its checkpoint
    (MetricsLogger), so each step must appear once, in order: checked here for every test."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return {}
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    steps = [d["step"] for d in rows]
    assert steps == sorted(set(steps)), f"steps logged twice or out of order: {steps}"
    return {d["step"]: d for d in rows}


def wait_for_step(proc: subprocess.Popen, run_dir: Path, step: int, timeout: float = 120) -> None:
    deadline = time.monotonic() + scaled(timeout)
    while step not in metrics(run_dir):
        if proc.poll() is not None:
            raise AssertionError(f"job exited ({proc.returncode}) before step {step}:\n"
                                 + proc.stdout.read()[-5000:])
        if time.monotonic() > deadline:
            raise AssertionError(f"step {step} not logged within {scaled(timeout):.0f}s")
        time.sleep(0.1)


def assert_same_metrics(got: dict, want: dict, steps, timing: tuple = TIMING_PREFIXES) -> int:
    """Every metric of `steps` except those starting with `timing` equal within
    REL_TOL/ABS_TOL; returns the number of values compared."""
    n = 0
    for s in steps:
        assert s in got and s in want, (s, sorted(got), sorted(want))
        keys = {k for k in want[s] if not k.startswith(timing)}
        assert keys == {k for k in got[s] if not k.startswith(timing)}, s
        for k in sorted(keys):
            assert math.isclose(got[s][k], want[s][k], rel_tol=REL_TOL, abs_tol=ABS_TOL), \
                f"step {s} {k}: resumed {got[s][k]!r} vs uninterrupted {want[s][k]!r}"
            n += 1
    return n


def root_cause(text: str) -> str:
    """torchrun's 'Root Cause (first observed failure)' section."""
    assert "Root Cause" in text, text[-5000:]
    return text.split("Root Cause", 1)[1]


def rank_failure(text: str, rank: int) -> str:
    """torchrun's failure entry for global `rank` ('' if it lists none). Its summary has every
    failed rank, under 'Failures:' or 'Root Cause'. Which failure torchrun saw first is a race:
    when rank 1 is killed, rank 0 may raise (connection reset) before torchrun reaps rank 1."""
    assert "Root Cause" in text, text[-5000:]
    summary = text[text.rfind("Failures:"):]
    entries = re.split(r"\n\s*\[\d+\]:", summary)
    return next((e for e in entries if f"rank      : {rank} (local_rank" in e), "")


def python() -> str:
    return sys.executable
