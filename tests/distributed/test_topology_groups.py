"""Topology under real torchrun (gloo): role worlds and groups, fail-fast, stuck collectives,
SIGUSR1 checkpoint + resume. Every run is a subprocess with a hard timeout."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hpc_rlhf.config import load_config
from hpc_rlhf.launch.plan import torchrun_argv
from hpc_rlhf.launch.smoke_roles import expected_total
from hpc_rlhf.topology import build_layout, free_port

pytestmark = pytest.mark.distributed
REPO = Path(__file__).resolve().parents[2]
TINY = str(REPO / "configs" / "tiny_disagg.yaml")
ONE_NODE = ["topology.nodes=1"]


def _argv(nproc, overrides):
    return torchrun_argv(TINY, [f"topology.procs_per_node={nproc}", *ONE_NODE, *overrides], 1,
                         nproc, f"127.0.0.1:{free_port()}", "test", 30)


def _env(run_dir, **extra):
    return {**os.environ, "HPC_RLHF_RUN_DIR": str(run_dir), "HPC_RLHF_PROGRAM": "smoke",
            "OMP_NUM_THREADS": "1", **extra}


def _run(nproc, overrides, run_dir, timeout=90, **extra):
    t0 = time.monotonic()
    out = subprocess.run(_argv(nproc, overrides), cwd=REPO, env=_env(run_dir, **extra),
                         capture_output=True, text=True, timeout=timeout)
    return out, time.monotonic() - t0


def test_disaggregated_worlds_and_groups_have_the_layout_sizes(tmp_path):
    overrides = ["train.num_steps=4"]
    out, _ = _run(4, overrides, tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
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
    out, secs = _run(3, ["train.num_steps=400", "rollout.prompts_per_step=4",
                         "train.batch_size=8"], tmp_path,
                     HPC_RLHF_SMOKE_FAIL_RANK="1", HPC_RLHF_SMOKE_FAIL_MODE=mode)
    text = out.stdout + out.stderr
    assert out.returncode != 0, text
    assert secs < 60, f"{secs:.0f}s"
    # torchrun's summary names the root-cause rank
    root = text.split("Root Cause")[1]
    assert "rank      : 1 (local_rank: 1)" in root, text
    assert ("SIGKILL" if mode == "kill" else "injected failure on rank 1") in root


def test_stuck_collective_times_out_naming_the_group(tmp_path):
    out, secs = _run(3, ["train.num_steps=400", "rollout.prompts_per_step=4",
                         "train.batch_size=8", "topology.timeout_s=3"], tmp_path,
                     HPC_RLHF_SMOKE_FAIL_RANK="2", HPC_RLHF_SMOKE_FAIL_MODE="hang",
                     HPC_RLHF_TERM_GRACE_S="3")
    text = out.stdout + out.stderr
    assert out.returncode != 0 and secs < 60, (secs, text)
    assert "all_reduce on group 'job'" in text and "timeout 3s = topology.timeout_s" in text, text


def test_sigusr1_checkpoints_writes_requeue_and_resume_gives_same_total(tmp_path):
    steps = 40
    overrides = [f"train.num_steps={steps}"]
    proc = subprocess.Popen(_argv(4, overrides), cwd=REPO, env=_env(tmp_path,
                            HPC_RLHF_SMOKE_STEP_S="0.1"),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 60
        while not (tmp_path / "smoke" / "rank3.json").exists():
            assert time.monotonic() < deadline and proc.poll() is None, proc.stdout.read()
            time.sleep(0.2)
        time.sleep(0.5)
        proc.send_signal(signal.SIGUSR1)  # torchrun forwards it to every rank
        text, _ = proc.communicate(timeout=60)
    finally:
        proc.kill()
    # torchrun itself exits 1 after forwarding a signal (SignalException); the contract only
    # needs the checkpoint and the marker.
    assert (tmp_path / "REQUEUE").exists(), text
    ckpt = json.loads((tmp_path / "smoke_ckpt.json").read_text())
    assert 0 < ckpt["next_step"] < steps, text
    (tmp_path / "REQUEUE").unlink()
    out, _ = _run(4, overrides, tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"resuming at step {ckpt['next_step']}" in out.stdout + out.stderr
    result = json.loads((tmp_path / "smoke_result.json").read_text())
    assert result["total"] == expected_total(steps, 4)
