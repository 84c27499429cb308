"""A real local SLURM cluster (scripts/slurm_cluster.sh) for the whole test session.

If the cluster cannot start, every test using it fails with the daemons' logs: nothing is
skipped. HPC_RLHF_SLURM_DIR picks the cluster directory (default: one per pytest process,
/tmp/hpc_rlhf_slurm_pytest_<pid>, removed at the end).
"""
from __future__ import annotations

import itertools
import os
import re
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from testlib import REPO, scaled, slurm_rdzv_ports

CLUSTER_SCRIPT = REPO / "scripts" / "slurm_cluster.sh"
FINAL_STATES = {
    "COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
    "BOOT_FAIL", "DEADLINE", "PREEMPTED",
}
_RDZV_TURN = itertools.count()


@dataclass(frozen=True)
class SlurmCluster:
    dir: Path
    conf: Path

    def env(self, **extra: str) -> dict[str, str]:
        """This process's environment for a SLURM command: the cluster's config, and a
        rendezvous port of its own for any job submitted with it (RDZV_PORT, read by the
        sbatch scripts and by submit's torchrun task)."""
        return {**os.environ, "SLURM_CONF": str(self.conf), "RDZV_PORT": self.rdzv_port(),
                **extra}

    def rdzv_port(self) -> str:
        """A torchrun rendezvous port for the next job (RDZV_PORT of the sbatch scripts): one of
        this cluster's own ports, in turn (testlib.slurm_rdzv_ports: no other cluster on this
        host uses them, while 20000 + job id repeats across clusters)."""
        ports = slurm_rdzv_ports(self.conf)
        return str(ports[next(_RDZV_TURN) % len(ports)])

    def sbatch(self, script: Path, *args: str, sbatch_args: tuple[str, ...] = (),
               cwd: Path = REPO, **env: str) -> str:
        """Submit `script` (with program `args`); returns the job id."""
        out = subprocess.run(
            ["sbatch", "--parsable", *sbatch_args, str(script), *args],
            cwd=cwd, env=self.env(**env), capture_output=True, text=True, timeout=scaled(30),
        )
        assert out.returncode == 0, f"sbatch failed: {out.stdout}{out.stderr}"
        return out.stdout.strip().split(";")[0]

    def job(self, job_id: str) -> dict[str, str]:
        """`scontrol show job` as a dict (JobState, ExitCode, Restarts, ...)."""
        out = subprocess.run(
            ["scontrol", "show", "job", "-o", job_id],
            env=self.env(), capture_output=True, text=True, timeout=scaled(30),
        )
        assert out.returncode == 0, f"scontrol show job {job_id}: {out.stdout}{out.stderr}"
        return dict(re.findall(r"(\w+)=(\S*)", out.stdout))

    def wait(self, job_id: str, timeout: float, restarts: int = 0) -> dict[str, str]:
        """Wait until the job is in a final state after at least `restarts` requeues (fail past
        scaled(timeout))."""
        deadline = time.monotonic() + scaled(timeout)
        while True:
            info = self.job(job_id)
            if info["JobState"] in FINAL_STATES and int(info["Restarts"]) >= restarts:
                return info
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"job {job_id} not finished after {scaled(timeout):.0f}s: {info}\n"
                    f"{self.logs()}"
                )
            time.sleep(0.5)

    def scancel_signal(self, job_id: str, signal: str = "USR1") -> None:
        out = subprocess.run(
            ["scancel", f"--signal={signal}", "--batch", job_id],
            env=self.env(), capture_output=True, text=True, timeout=scaled(30),
        )
        assert out.returncode == 0, f"scancel failed: {out.stdout}{out.stderr}"

    def logs(self, lines: int = 30) -> str:
        parts = []
        for f in sorted((self.dir / "log").glob("*.log")):
            tail = f.read_text(errors="replace").splitlines()[-lines:]
            parts.append(f"===== {f} =====\n" + "\n".join(tail))
        return "\n".join(parts)


# Preemption for tests/slurm/test_rl_preempt_slurm.py: jobs in `high` preempt jobs in `low`
# (requeued; SIGCONT+SIGTERM at once, SIGKILL after GraceTime). `debug`, the default partition
# of every other test, cannot be preempted.
_PART = "Nodes=node[1-2] MaxTime=INFINITE State=UP OverSubscribe=NO"
PREEMPT_CONF = (
    "\n# Added by tests/slurm/conftest.py: partition-priority preemption.\n"
    "PreemptType=preempt/partition_prio\nPreemptMode=REQUEUE\n"
    f"PartitionName=low {_PART} PriorityTier=1 PreemptMode=REQUEUE GraceTime=60\n"
    f"PartitionName=high {_PART} PriorityTier=2 PreemptMode=OFF\n")


def _enable_preemption(conf: Path) -> None:
    """Add the partitions above to a running cluster (idempotent; scontrol reconfigure)."""
    text = conf.read_text()
    if "PreemptType=" not in text:
        text = re.sub(r"^(PartitionName=debug .*)$", r"\1 PreemptMode=OFF", text, flags=re.M)
        conf.write_text(text + PREEMPT_CONF)
        env = {**os.environ, "SLURM_CONF": str(conf)}
        out = subprocess.run(["scontrol", "reconfigure"], env=env, capture_output=True,
                             text=True, timeout=scaled(60))
        assert out.returncode == 0, f"scontrol reconfigure: {out.stdout}{out.stderr}"
    deadline = time.monotonic() + scaled(30)
    while True:
        parts = subprocess.run(["sinfo", "-h", "-o", "%R"], env={**os.environ,
                               "SLURM_CONF": str(conf)}, capture_output=True, text=True,
                               timeout=scaled(30)).stdout.split()
        if {"low", "high"} <= set(parts):
            return
        assert time.monotonic() < deadline, f"partitions low/high not up: {parts}"
        time.sleep(0.5)


def _run_script(*args: str, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(CLUSTER_SCRIPT), *args], capture_output=True, text=True, timeout=timeout,
    )


@pytest.fixture(scope="session")
def slurm_cluster():
    # Each session gets its own cluster (concurrent sessions on one host must not stop each
    # other's); HPC_RLHF_SLURM_DIR reuses a given one and leaves it running if it was up.
    cluster_dir = Path(os.environ.get("HPC_RLHF_SLURM_DIR",
                                      f"/tmp/hpc_rlhf_slurm_pytest_{os.getpid()}"))
    already_up = _run_script("status", str(cluster_dir), timeout=60).returncode == 0
    # 300 s: a fresh CI machine installs slurm-wlm and munge with apt-get first.
    start = _run_script("start", str(cluster_dir), timeout=300)
    if start.returncode != 0:
        pytest.fail(f"local SLURM cluster did not start:\n{start.stdout}\n{start.stderr}")
    try:
        _enable_preemption(cluster_dir / "slurm.conf")
    except AssertionError as e:
        pytest.fail(f"local SLURM cluster: could not enable preemption: {e}")
    old_conf = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = str(cluster_dir / "slurm.conf")
    try:
        yield SlurmCluster(dir=cluster_dir, conf=cluster_dir / "slurm.conf")
    finally:
        if old_conf is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = old_conf
        if not already_up:  # leave a cluster someone else started running
            stop = _run_script("stop", str(cluster_dir), timeout=120)
            if stop.returncode == 0 and "HPC_RLHF_SLURM_DIR" not in os.environ:
                shutil.rmtree(cluster_dir, ignore_errors=True)
