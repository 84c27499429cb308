"""The plain-sbatch path on the real local SLURM cluster: `submit --sbatch` checks before
queueing, the rendered script checks again before any rank starts, a requeue that fails ends the
job FAILED, and a second job of the same run waits for the first (singleton)."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from hpc_rlhf.launch.sbatch import SCRIPTS, SbatchSpec, render_sbatch
from testlib import REPO, scaled, wait_until

pytestmark = pytest.mark.slurm
TINY = "configs/tiny_disagg.yaml"


def _submit(slurm_cluster, *args, **env):
    return subprocess.run([sys.executable, "-m", "hpc_rlhf.submit", "--config", TINY,
                           "--sbatch", *args], cwd=REPO, env=slurm_cluster.env(**env),
                          capture_output=True, text=True, timeout=scaled(300))


def _jobs_named(slurm_cluster, name: str) -> str:
    return subprocess.run(["squeue", "-h", "-t", "all", "-n", name, "-o", "%i %T"],
                          env=slurm_cluster.env(), capture_output=True, text=True,
                          timeout=scaled(30)).stdout.strip()


def _accounted_jobs_named(slurm_cluster, name: str) -> str | None:
    """What sacct lists of jobs with that name (any state, the past week), or None where the
    cluster keeps no accounting (the local test cluster: AccountingStorageType=none)."""
    out = subprocess.run(["sacct", "-n", "-X", "-a", "-S", "now-7days", "--name", name, "-o",
                          "JobID,State"], env=slurm_cluster.env(), capture_output=True,
                         text=True, timeout=scaled(30))
    if "accounting storage is disabled" in out.stdout + out.stderr:
        return None
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout.strip()


def _jobs_submitted(slurm_cluster) -> tuple:
    """(since when, how many jobs) the controller counts as submitted (sdiag; its counters
    restart at midnight)."""
    out = subprocess.run(["sdiag"], env=slurm_cluster.env(), capture_output=True, text=True,
                         timeout=scaled(30), check=True).stdout
    since = next(line for line in out.splitlines() if line.startswith("Data since"))
    count = next(line for line in out.splitlines() if line.startswith("Jobs submitted:"))
    return since, int(count.split(":")[1])


@pytest.mark.parametrize("override,named", [
    ("train.num_stpes=3", "train.num_stpes"),
    ("reward.source=remote reward.remote_url=${REWARD_URL}", "${REWARD_URL}"),
])
def test_bad_override_is_refused_before_anything_is_queued(slurm_cluster, tmp_path, override,
                                                           named):
    name = f"refused_{len(named)}"
    before = _jobs_submitted(slurm_cluster)
    out = _submit(slurm_cluster, *override.split(), f"launch.name={name}",
                  f"launch.run_dir={tmp_path}/run", REWARD_URL="")
    assert out.returncode == 2, out.stdout[-2000:] + out.stderr
    assert named in out.stderr and "submitted job" not in out.stdout
    assert _jobs_named(slurm_cluster, name) == ""
    assert _accounted_jobs_named(slurm_cluster, name) in ("", None)  # None: no accounting here
    # Without accounting, the controller's own count: no job was submitted at all.
    after = _jobs_submitted(slurm_cluster)
    assert after == before or (after[0] != before[0] and after[1] == 0), (before, after)
    assert not (tmp_path / "run" / "job.sbatch").exists()


def test_sbatch_path_runs_two_nodes_with_the_rendered_script(slurm_cluster, tmp_path):
    run_dir = tmp_path / "run"
    out = _submit(slurm_cluster, "--program", "smoke", "--wait", "train.num_steps=3",
                  "launch.name=sbatch_path", f"launch.run_dir={run_dir}",
                  "launch.env=[HPC_RLHF_TEST_MARK=seen]")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr
    script = (run_dir / "job.sbatch").read_text()
    assert "#SBATCH --nodes=2" in script and "train.num_steps=3" in script
    assert "export HPC_RLHF_TEST_MARK=seen" in script
    ranks = [json.loads((run_dir / "smoke" / f"rank{r}.json").read_text()) for r in range(4)]
    assert sorted({r["node"] for r in ranks}) == ["node1", "node2"]


def _main_script(tmp_path, **spec) -> tuple:
    """A script rendered like slurm/ppo_70b.sbatch, for the tiny 2-node config."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    spec = SbatchSpec(job_name=spec.pop("job_name", "tiny_main"), nodes=2, gpus_per_node=0,
                      nproc_per_node=2, cpus_per_task=1, time="00:10:00",
                      config=str(REPO / TINY), extra_env=(("HPC_RLHF_PROGRAM", "smoke"),),
                      **spec)
    script = tmp_path / "job.sbatch"
    script.write_text(render_sbatch(spec))
    return script, tmp_path / "run", tmp_path / "job.out"


@pytest.mark.parametrize("bad,named", [
    ("train.num_stpes=3", "train.num_stpes"),
    ("topology.nodes=1", "topology.nodes=1 but this job has 2 node(s)"),
])
def test_checked_in_script_checks_its_arguments_before_starting_ranks(slurm_cluster, tmp_path,
                                                                       bad, named):
    script, run_dir, log = _main_script(tmp_path)
    job = slurm_cluster.sbatch(script, bad, sbatch_args=(f"--output={log}",),
                               PYTHON=sys.executable, RUN_DIR=str(run_dir))
    info = slurm_cluster.wait(job, timeout=120)
    text = log.read_text() if log.exists() else ""
    assert (info["JobState"], info["ExitCode"]) == ("FAILED", "2:0"), text
    assert named in text and "the config check above failed; nothing was started" in text
    assert not list(run_dir.glob("logs/rank*.log")), "a rank started"


def test_requeue_that_fails_ends_the_job_failed(slurm_cluster, tmp_path):
    """`sbatch --no-requeue` makes `scontrol requeue` refuse: the checkpoint is kept, the job
    must not end COMPLETED as if it had finished."""
    run_dir, log = tmp_path / "run", tmp_path / "tiny.out"
    job = slurm_cluster.sbatch(REPO / "slurm" / "tiny_test.sbatch", "--steps", "400",
                               "--step-seconds", "0.1",
                               sbatch_args=(f"--output={log}", "--no-requeue"),
                               PYTHON=sys.executable, RUN_DIR=str(run_dir))
    progress = run_dir / "progress.json"
    wait_until(lambda: progress.exists() and json.loads(progress.read_text())["step"] >= 2,
               90, "tiny_test to reach step 2")
    slurm_cluster.scancel_signal(job, "USR1")
    info = slurm_cluster.wait(job, timeout=120)
    text = log.read_text()
    assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("FAILED", "1:0", "0"), text
    assert f"[sbatch] FAILED to requeue job {job}" in text and str(run_dir) in text, text


def test_second_job_of_the_same_run_waits_for_the_first(slurm_cluster, tmp_path):
    assert "--dependency=singleton" in render_sbatch(SCRIPTS["tiny_test"])
    jobs = [slurm_cluster.sbatch(REPO / "slurm" / "tiny_test.sbatch", "--steps", str(steps),
                                 "--step-seconds", "0.1",
                                 sbatch_args=(f"--output={tmp_path}/job{k}.out",),
                                 PYTHON=sys.executable, RUN_DIR=str(tmp_path / f"run{k}"))
            for k, steps in enumerate((30, 5))]
    progress = tmp_path / "run0" / "progress.json"
    wait_until(lambda: progress.exists(), 90, "the first job to start")
    second = slurm_cluster.job(jobs[1])
    assert (second["JobState"], second["Reason"]) == ("PENDING", "Dependency"), second
    first = slurm_cluster.wait(jobs[0], timeout=120)
    assert first["JobState"] == "COMPLETED"
    assert slurm_cluster.wait(jobs[1], timeout=120)["JobState"] == "COMPLETED"
    assert json.loads((tmp_path / "run1" / "result.json").read_text())["steps"] == 5


def test_a_job_on_a_run_directory_in_use_by_another_job_is_refused(slurm_cluster, tmp_path):
    run_dir = tmp_path / "run"
    first, _, first_log = _main_script(tmp_path / "a", job_name="owner_a")
    second, _, second_log = _main_script(tmp_path / "b", job_name="owner_b")
    env = dict(PYTHON=sys.executable, RUN_DIR=str(run_dir), HPC_RLHF_SMOKE_STEP_S="0.5")
    job_a = slurm_cluster.sbatch(first, "train.num_steps=400",
                                 sbatch_args=(f"--output={first_log}",), **env)
    wait_until(lambda: (run_dir / "SLURM_JOB").exists(), 90, "the first job to claim the run dir")
    job_b = slurm_cluster.sbatch(second, "train.num_steps=40",
                                 sbatch_args=(f"--output={second_log}",), **env)
    info = slurm_cluster.wait(job_b, timeout=120)
    text = second_log.read_text()
    assert info["JobState"] == "FAILED", text
    assert f"is in use by SLURM job {job_a}, which is still queued or running" in text, text
    assert slurm_cluster.job(job_a)["JobState"] == "RUNNING"
    subprocess.run(["scancel", job_a], env=slurm_cluster.env(), timeout=scaled(30))
    slurm_cluster.wait(job_a, timeout=120)


def test_status_logs_and_cancel_of_a_slurm_job_by_its_id(slurm_cluster, tmp_path):
    import re

    def jobs(*args):
        return subprocess.run([sys.executable, "-m", "hpc_rlhf.submit", *args], cwd=REPO,
                              env=slurm_cluster.env(), capture_output=True, text=True,
                              timeout=scaled(60))
    run_dir = tmp_path / "run"
    out = _submit(slurm_cluster, "--program", "smoke", "train.num_steps=400",
                  "launch.name=jobs_cli", f"launch.run_dir={run_dir}",
                  HPC_RLHF_SMOKE_STEP_S="0.5")
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr
    job = re.search(r"submitted job (\d+)", out.stdout).group(1)
    wait_until(lambda: (run_dir / "smoke").is_dir(), 90, "the job's ranks to start")
    status = jobs("status", job)
    assert f"run {run_dir}: rl" in status.stdout, status.stdout + status.stderr
    assert f"state: SLURM job {job} RUNNING on node[1-2]" in status.stdout, status.stdout
    assert jobs("status", str(run_dir)).stdout == status.stdout  # by directory: the same
    log = jobs("logs", job, "-n", "5")
    assert log.stdout.startswith(f"==> {run_dir / 'logs' / f'jobs_cli-{job}.out'} <==")
    cancel = jobs("cancel", job)
    assert cancel.returncode == 0 and "SIGTERM sent" in cancel.stdout, cancel.stderr
    slurm_cluster.wait(job, timeout=120)
    after = jobs("status", str(run_dir))
    assert "RUNNING" not in after.stdout and "rerun the same command" in after.stdout, after.stdout


def test_ctrl_c_on_wait_stops_waiting_not_the_job(slurm_cluster, tmp_path):
    import re
    import signal
    proc = subprocess.Popen(
        [sys.executable, "-m", "hpc_rlhf.submit", "--config", TINY, "--sbatch", "--wait",
         "--program", "smoke", "train.num_steps=400", "launch.name=wait_ctrl_c",
         f"launch.run_dir={tmp_path / 'run'}"], cwd=REPO,
        env=slurm_cluster.env(HPC_RLHF_SMOKE_STEP_S="0.5"), stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True)
    wait_until(lambda: (tmp_path / "run" / "SLURM_JOB").exists(), 90, "the job to start")
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=scaled(60))
    job = re.search(r"submitted job (\d+)", out).group(1)
    assert proc.returncode == 130 and "Traceback" not in out, out[-2000:]
    assert f"stopped waiting; job {job} keeps running" in out
    assert slurm_cluster.job(job)["JobState"] == "RUNNING"
    subprocess.run(["scancel", job], env=slurm_cluster.env(), timeout=scaled(30))
    slurm_cluster.wait(job, timeout=120)
