"""Case 6: secrets of a remote reward server (a password in reward.remote_url, a ${ENV} token
in its query, the API key in $HPC_RLHF_REWARD_API_KEY) never reach the run directory: saved
config.yaml, rank logs, metrics.jsonl, tensorboard events."""
import os
import re
import subprocess
import sys

import pytest

from rljob import GRPO, REPO, metrics
from testlib import scaled

pytestmark = pytest.mark.distributed

PASSWORD, TOKEN, API_KEY = "pw-Xq7Zr2Lk", "tok-9fHs3Vbn", "key-Mn4Tb8Wc"


def _start_server(env):
    proc = subprocess.Popen([sys.executable, "-m", "hpc_rlhf.rewards.server", "--task", "repeat",
                             "--port", "0"], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:   # bounded by the test timeout
        m = re.search(r"port=(\d+)", line)
        if m:
            return proc, int(m.group(1))
    raise AssertionError(f"reward server did not start ({proc.wait()})")


@pytest.mark.timeout(scaled(180))
def test_remote_reward_secrets_stay_out_of_the_run_dir(tmp_path):
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", HPC_RLHF_REWARD_API_KEY=API_KEY, FAULTS_RW_TOKEN=TOKEN,
               HPC_RLHF_RUN_DIR=str(tmp_path / "run"))
    server, port = _start_server(env)
    try:
        url = f"http://alice:{PASSWORD}@127.0.0.1:{port}/score?token=${{FAULTS_RW_TOKEN}}"
        out = subprocess.run(
            [sys.executable, "-m", "hpc_rlhf.launch.main", "--config", GRPO, "rollout.engine=hf",
             "train.num_steps=2", "reward.source=remote", f"reward.remote_url={url}",
             "logging.tensorboard=true", "checkpoint.save_every=0"],
            cwd=REPO, env=env, capture_output=True, text=True, timeout=scaled(150))
    finally:
        server.kill()
        server.wait(timeout=scaled(10))
    text = out.stdout + out.stderr
    assert out.returncode == 0, text[-5000:]
    run_dir = tmp_path / "run"
    got = metrics(run_dir)
    assert sorted(got) == [1, 2] and all("reward/mean" in m for m in got.values())
    files = [p for p in run_dir.rglob("*") if p.is_file()]
    assert any(p.parent.name == "tensorboard" for p in files)
    assert (run_dir / "config.yaml").exists() and (run_dir / "logs" / "rank0.log").exists()
    # The saved config still says where rewards come from (masked), so a reader can tell.
    assert "127.0.0.1" in (run_dir / "config.yaml").read_text()
    leaks = []
    for p in files:
        data = p.read_bytes()
        leaks += [(str(p.relative_to(run_dir)), s) for s in (PASSWORD, TOKEN, API_KEY)
                  if s.encode() in data]
    assert not leaks, leaks
    assert not any(s in text for s in (PASSWORD, TOKEN, API_KEY)), "secret on the console"
