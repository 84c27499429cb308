"""Topology under real torchrun (gloo): role worlds and groups, fail-fast, stuck collectives,
SIGUSR1 checkpoint + resume. Every run is a subprocess with a hard timeout."""
import json
import os
import signal
import subprocess

import pytest

from testlib import REPO, TORCHRUN_ENDPOINT, TimedOutput, scaled, wait_until

from hpc_rlhf.config import load_config
from hpc_rlhf.launch.plan import torchrun_argv
from hpc_rlhf.launch.smoke_roles import expected_total
from hpc_rlhf.topology import build_layout

pytestmark = pytest.mark.distributed
TINY = str(REPO / "configs" / "tiny_disagg.yaml")
ONE_NODE = ["topology.nodes=1"]
# hpc_rlhf/launch/smoke_roles.py prints it when HPC_RLHF_SMOKE_FAIL_RANK fails on purpose.
FAILURE_LINE = "smoke: injected failure"


def _argv(nproc, overrides):
    # c10d on port 0: torchrun binds a free port itself (no port found now and bound later).
    return torchrun_argv(TINY, [f"topology.procs_per_node={nproc}", *ONE_NODE, *overrides], 1,
                         nproc, TORCHRUN_ENDPOINT, "test", 30)


def _env(run_dir, **extra):
    return {**os.environ, "HPC_RLHF_RUN_DIR": str(run_dir), "HPC_RLHF_PROGRAM": "smoke",
            "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **extra}


def _start(nproc, overrides, run_dir, **extra) -> subprocess.Popen:
    return subprocess.Popen(_argv(nproc, overrides), cwd=REPO, env=_env(run_dir, **extra),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _run(nproc, overrides, run_dir, timeout=90, **extra):
    """(exit code, output, seconds from the injected-failure line to torchrun's exit: None
    without one)."""
    proc = _start(nproc, overrides, run_dir, **extra)
    out = TimedOutput(proc)
    try:
        rc, t_exit = out.wait(timeout)
    finally:
        proc.kill()
    t_fail = out.first(FAILURE_LINE)
    return rc, out.text, None if t_fail is None else t_exit - t_fail


def test_disaggregated_worlds_and_groups_have_the_layout_sizes(tmp_path):
    overrides = ["train.num_steps=4"]
    rc, text, _ = _run(4, overrides, tmp_path)
    assert rc == 0, text
    lay = build_layout(load_config(TINY, [*ONE_NODE, "topology.procs_per_node=4"]))
    for info in lay.ranks:
        got = json.loads((tmp_path / "smoke" / f"rank{info.rank}.json").read_text())
        assert got["roles"] == list(info.roles) and got["world"] == info.world
        m = got["measured"]
        assert m["world"] == info.world_size and m["job"] == 4
        if info.is_trainer:
            assert (m["dp"], m["tp"], m["sp"]) == (3, 1, 1)
        assert ("sync" in m) == (info.rank in lay.sync_ranks)
        if "sync" in m:
            assert m["sync"] == 4 * 42.0  # broadcast from the actor reached every member
    result = json.loads((tmp_path / "smoke_result.json").read_text())
    assert result["total"] == expected_total(4, 4)
    assert (tmp_path / "layout.txt").read_text().startswith("mode=disaggregated world=4")
    assert "[rank 3] rollout world 'rollout0'" in (tmp_path / "logs" / "rank3.log").read_text()
    assert "topology:" in (tmp_path / "config.yaml").read_text()


@pytest.mark.parametrize("mode", ["kill", "raise"])
def test_failing_rank_ends_the_job_fast_and_is_named(tmp_path, mode):
    rc, text, secs = _run(3, ["train.num_steps=400", "rollout.prompts_per_step=4",
                              "train.batch_size=8"], tmp_path,
                          HPC_RLHF_SMOKE_FAIL_RANK="1", HPC_RLHF_SMOKE_FAIL_MODE=mode)
    assert rc != 0, text
    assert secs is not None and secs < scaled(60), (secs, text[-3000:])  # from the failure
    # torchrun's summary names the root-cause rank
    root = text.split("Root Cause")[1]
    assert "rank      : 1 (local_rank: 1)" in root, text
    assert ("SIGKILL" if mode == "kill" else "injected failure on rank 1") in root


def test_stuck_collective_times_out_naming_the_group(tmp_path):
    rc, text, secs = _run(3, ["train.num_steps=400", "rollout.prompts_per_step=4",
                              "train.batch_size=8", "topology.timeout_s=3"], tmp_path,
                          HPC_RLHF_SMOKE_FAIL_RANK="2", HPC_RLHF_SMOKE_FAIL_MODE="hang",
                          HPC_RLHF_TERM_GRACE_S="3")
    assert rc != 0, text
    # From the moment rank 2 starts hanging: the 3 s collective timeout, then the 3 s grace.
    assert secs is not None and secs < scaled(60), (secs, text[-3000:])
    assert "all_reduce on group 'job'" in text and "timeout 3s = topology.timeout_s" in text, text


def test_sigusr1_checkpoints_writes_requeue_and_resume_gives_same_total(tmp_path):
    steps = 40
    overrides = [f"train.num_steps={steps}"]
    proc = _start(4, overrides, tmp_path, HPC_RLHF_SMOKE_STEP_S="0.1")
    out = TimedOutput(proc)
    try:
        # Every rank handles SIGUSR1 once every rank wrote its rank file: each installed its
        # handlers first thing (launch/main.py), before the groups; torchrun before starting
        # them. (The flag waits for the next step boundary, so no later state is needed.)
        wait_until(lambda: proc.poll() is not None or all(
            (tmp_path / "smoke" / f"rank{r}.json").exists() for r in range(4)), 60,
            "the 4 ranks to start")
        assert proc.poll() is None, out.text
        proc.send_signal(signal.SIGUSR1)  # torchrun forwards it to every rank
        out.wait(60)
        text = out.text
    finally:
        proc.kill()
    # torchrun itself exits 1 after forwarding a signal (SignalException); the contract only
    # needs the checkpoint and the marker.
    assert (tmp_path / "REQUEUE").exists(), text
    ckpt = json.loads((tmp_path / "smoke_ckpt.json").read_text())
    assert 0 < ckpt["next_step"] < steps, text
    (tmp_path / "REQUEUE").unlink()
    rc, text, _ = _run(4, overrides, tmp_path)
    assert rc == 0, text
    assert f"resuming at step {ckpt['next_step']}" in text
    result = json.loads((tmp_path / "smoke_result.json").read_text())
    assert result["total"] == expected_total(steps, 4)
