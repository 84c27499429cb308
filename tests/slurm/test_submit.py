"""`python -m hpc_rlhf.submit` on the real local 2-node SLURM cluster (submitit + torchrun)."""
import json
import re
import subprocess
import sys
import time

import pytest

from testlib import REPO, TimedOutput, scaled, wait_until

from hpc_rlhf.launch.smoke_roles import expected_total

pytestmark = pytest.mark.slurm


def _submit(slurm_cluster, tmp_path, *extra, event, env=None, timeout=120):
    """Run `submit --wait` to its end: (exit code, output, seconds from `event` to the exit).
    `event()` is polled while it runs and must turn true once the event a deadline is about
    has happened (a file the ranks write): scheduling and the ranks' start-up come before it
    and vary a lot on a loaded host."""
    argv = [sys.executable, "-m", "hpc_rlhf.submit", "--config", "configs/tiny_disagg.yaml",
            "--program", "smoke", "--wait", f"launch.run_dir={tmp_path}/run", *extra]
    proc = subprocess.Popen(argv, cwd=REPO, env=slurm_cluster.env(**(env or {})),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out, t_event = TimedOutput(proc), None
    deadline = time.monotonic() + scaled(timeout)
    try:
        while proc.poll() is None:
            if t_event is None and event():
                t_event = time.monotonic()
            assert time.monotonic() < deadline, f"submit still running:\n{out.text[-5000:]}"
            time.sleep(0.05)
        rc, t_exit = out.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
    if t_event is None and event():  # it happened within the last poll interval
        t_event = t_exit
    return rc, out.text, None if t_event is None else t_exit - t_event


def _logged(path, needle):
    return lambda: path.exists() and needle in path.read_text(errors="replace")


def test_submit_smoke_two_nodes_disaggregated(slurm_cluster, tmp_path):
    run = tmp_path / "run"
    # From the first rank log line (written once every rank is up and the groups are built;
    # the ranks announce no earlier point) to submit's exit: the steps, the teardown, and
    # submit noticing the job's end.
    rc, text, secs = _submit(slurm_cluster, tmp_path, "train.num_steps=3",
                             event=lambda: any((run / "logs").glob("rank*.log")))
    assert rc == 0, text
    assert secs is not None and secs < scaled(60), (secs, text[-3000:])
    ranks = [json.loads((run / "smoke" / f"rank{r}.json").read_text()) for r in range(4)]
    # 2 nodes x 2 ranks: torchrun gives each node's agent two consecutive ranks; which node
    # gets ranks 0-1 depends on the order the agents reach the c10d rendezvous.
    nodes = [r["node"] for r in ranks]
    assert nodes[0] == nodes[1] and nodes[2] == nodes[3], text
    assert sorted({nodes[0], nodes[2]}) == ["node1", "node2"], text
    assert [r["roles"] for r in ranks] == [["actor"]] * 3 + [["rollout"]]
    assert [r["measured"]["world"] for r in ranks] == [3, 3, 3, 1]
    assert all(r["measured"]["job"] == 4 for r in ranks)
    result = json.loads((run / "smoke_result.json").read_text())
    assert result["total"] == expected_total(3, 4)
    assert (run / "layout.txt").exists() and (run / "config.yaml").exists()


def test_submit_failing_rank_ends_promptly_and_names_it(slurm_cluster, tmp_path):
    # From rank 3's "injected failure" line (hpc_rlhf/launch/smoke_roles.py; logs/rank3.log)
    # to submit's exit with the failure.
    rank3 = tmp_path / "run" / "logs" / "rank3.log"
    rc, text, secs = _submit(slurm_cluster, tmp_path, "train.num_steps=400",
                             event=_logged(rank3, "smoke: injected failure"),
                             env={"HPC_RLHF_SMOKE_FAIL_RANK": "3"})
    assert rc == 1, text
    assert secs is not None and secs < scaled(60), (secs, text[-3000:])
    assert "rank      : 3 (local_rank: 1)" in text and "injected failure on rank 3" in text, text
    # the closing line names the failed rank, its reason and its log (from logs/failed_rank3.txt)
    line = re.search(r"\[submit\] job \d+ FAILED on rank 3: RuntimeError: smoke: injected "
                     r"failure on rank 3 at step \d+ .*; full log: (\S+)", text)
    assert line and line.group(1) == str(tmp_path / "run" / "logs" / "rank3.log"), text[-3000:]


def test_submit_preemption_signal_checkpoints_requeues_and_resumes(slurm_cluster, tmp_path):
    steps = 60
    argv = [sys.executable, "-m", "hpc_rlhf.submit", "--config", "configs/tiny_disagg.yaml",
            "--program", "smoke", f"launch.run_dir={tmp_path}/run", f"train.num_steps={steps}"]
    out = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=scaled(60),
                         env=slurm_cluster.env(HPC_RLHF_SMOKE_STEP_S="0.2"))
    assert out.returncode == 0, out.stdout + out.stderr
    job = out.stdout.split("[submit] submitted job ")[1].split(":")[0]
    run = tmp_path / "run"
    # Every process the signal reaches handles it once all four ranks wrote their rank file:
    # each rank installed its handlers first thing (launch/main.py), torchrun before starting
    # them, and each node's TorchrunTask right after starting torchrun.
    wait_until(lambda: all((run / "smoke" / f"rank{r}.json").exists() for r in range(4)), 60,
               f"the 4 ranks of job {job} to start")
    # submitit's preemption signal (USR2) to every task; TorchrunTask forwards USR1 to torchrun
    subprocess.run(["scancel", "--signal=USR2", job], env=slurm_cluster.env(), check=True,
                   timeout=scaled(30))
    info = slurm_cluster.wait(job, timeout=120, restarts=1)
    logs = "\n".join(p.read_text() for p in sorted((run / "submitit").glob("*.out")))
    assert (info["JobState"], info["Restarts"]) == ("COMPLETED", "1"), (info, logs)
    assert "requeueing job" in logs, logs
    result = json.loads((run / "smoke_result.json").read_text())
    assert result["restart"] == 1 and result["total"] == expected_total(steps, 4), logs
    assert not (run / "REQUEUE").exists()
