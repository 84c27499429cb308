"""Every shipped config loads, validates and plans (the dry run a user sees first), and both
launcher scripts start a real 2-rank job that runs the `smoke` program to its expected total."""
import json
import os
import subprocess
import sys

import pytest

from hpc_rlhf.config import load_config, validate
from hpc_rlhf.launch.smoke_roles import expected_total
from hpc_rlhf.launch.submit import main as submit_main
from testlib import REPO, TORCHRUN_ENDPOINT, scaled

CONFIGS = sorted(p.name for p in (REPO / "configs").glob("*.yaml"))


@pytest.mark.unit
def test_every_config_is_tested():
    assert len(CONFIGS) >= 18, CONFIGS  # a glob that finds nothing must not pass vacuously


@pytest.mark.unit
@pytest.mark.parametrize("name", CONFIGS)
def test_config_loads_validates_and_dry_runs(name, capsys, tmp_path, monkeypatch):
    """The dry run plans every config; it exits 2 (after the plan) only for the cluster configs,
    whose hub datasets and ${REWARD_URL} this machine lacks (tests/unit/test_preflight.py)."""
    from hpc_rlhf.data.synthetic import write_toy_datasets
    monkeypatch.setenv("HPC_RLHF_RUN_DIR", str(tmp_path / "run"))  # not the repo's runs/
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.delenv("REWARD_URL", raising=False)
    monkeypatch.chdir(tmp_path)  # relative data paths: the tiny configs' runs/tiny_data
    os.symlink(REPO / "examples", tmp_path / "examples")
    write_toy_datasets(tmp_path / "runs" / "tiny_data", n_train=8, n_eval=4)
    path = REPO / "configs" / name
    cfg = load_config(path)
    validate(cfg)
    rc = submit_main(["--config", str(path), "--dry-run"])
    out = capsys.readouterr().out
    assert "== layout" in out and "== memory per GPU" in out and "== torchrun command" in out
    assert f"--nproc-per-node {cfg.topology.procs_per_node}" in out
    cluster_only = name in ("dpo_7b.yaml", "ppo_70b.yaml", "sft_7b.yaml")
    assert rc == (2 if cluster_only else 0), out[-2000:]
    assert ("problem(s) in" in out) == cluster_only


def _smoke_env(run_dir):
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    return {**env, "PYTHON": sys.executable, "HPC_RLHF_PROGRAM": "smoke",
            "HPC_RLHF_RUN_DIR": str(run_dir), "HPC_RLHF_SMOKE_STEP_S": "0"}


def _assert_smoke_done(run_dir, out):
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    result = json.loads((run_dir / "smoke_result.json").read_text())
    assert result["world"] == 2 and result["total"] == expected_total(3, 2), result


@pytest.mark.distributed
def test_local_launcher_runs_two_ranks(tmp_path):
    run_dir = tmp_path / "run"
    out = subprocess.run(["bash", "launchers/local.sh", "configs/grpo_tiny.yaml",
                          "topology.procs_per_node=2", "train.num_steps=3",
                          f"launch.run_dir={run_dir}"],
                         cwd=REPO, env=_smoke_env(run_dir), capture_output=True, text=True,
                         timeout=scaled(180))
    _assert_smoke_done(run_dir, out)


@pytest.mark.distributed
def test_torchrun_launcher_runs_two_ranks(tmp_path):
    run_dir = tmp_path / "run"
    host, port = TORCHRUN_ENDPOINT.split(":")
    env = {**_smoke_env(run_dir), "NPROC_PER_NODE": "2", "HEAD_ADDR": host, "RDZV_PORT": port}
    out = subprocess.run(["bash", "launchers/torchrun.sh", "configs/grpo_tiny.yaml",
                          "topology.procs_per_node=2", "train.num_steps=3"],
                         cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=scaled(180))
    _assert_smoke_done(run_dir, out)
    # MAX_RESTARTS reaches torchrun: after a rank fails, torchrun (its INFO log) restarts the
    # ranks once, then gives up.
    failing = {**env, "MAX_RESTARTS": "1", "HPC_RLHF_SMOKE_FAIL_RANK": "1", "LOGLEVEL": "INFO",
               "HPC_RLHF_RUN_DIR": str(tmp_path / "failing")}
    out = subprocess.run(["bash", "launchers/torchrun.sh", "configs/grpo_tiny.yaml",
                          "topology.procs_per_node=2", "train.num_steps=3"],
                         cwd=REPO, env=failing, capture_output=True, text=True,
                         timeout=scaled(180))
    log = out.stdout + out.stderr
    assert out.returncode != 0 and "[rank 1] smoke: injected failure" in out.stdout, log[-3000:]
    assert log.count("attempts left; will restart worker group") == 1, log[-3000:]
    assert "Worker group FAILED. 1/1 attempts left" in log
    # A rank that fails in the first attempt only: the restarted ranks build their process
    # groups again (on a fresh store: the shared one held the last round's keys) and finish.
    once = {**failing, "HPC_RLHF_SMOKE_FAIL_ATTEMPT": "0",
            "HPC_RLHF_RUN_DIR": str(tmp_path / "once")}
    out = subprocess.run(["bash", "launchers/torchrun.sh", "configs/grpo_tiny.yaml",
                          "topology.procs_per_node=2", "train.num_steps=3"],
                         cwd=REPO, env=once, capture_output=True, text=True,
                         timeout=scaled(240))
    assert "[rank 1] smoke: injected failure" in out.stdout, (out.stdout + out.stderr)[-3000:]
    _assert_smoke_done(tmp_path / "once", out)


@pytest.mark.unit
def test_torchrun_launcher_refuses_several_nodes_without_a_head_address():
    env = {k: v for k, v in os.environ.items() if k != "HEAD_ADDR"}
    out = subprocess.run(["bash", "launchers/torchrun.sh", "configs/grpo_tiny.yaml"], cwd=REPO,
                         env={**env, "NNODES": "2"}, capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "NNODES=2 needs HEAD_ADDR" in out.stderr
