"""Rewards from the reference HTTP server (`python -m hpc_rlhf.rewards.server`), whose first
request hangs 5 s against a 1 s client timeout: the run must retry, complete, and train on
exactly the rewards the built-in task gives (compared step by step with the task-reward
reference run of the same seed, `grpo_hf_reference`)."""
import re
import subprocess
import sys
import time

import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.deepspeed]

STEPS = 3
TIMEOUT_S = 1.0


@pytest.fixture
def reward_url():
    proc = subprocess.Popen(
        [sys.executable, "-m", "hpc_rlhf.rewards.server", "--task", "repeat", "--port", "0",
         "--hang-first", "1", "--hang-s", "5"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 60
        line = ""
        while time.monotonic() < deadline and proc.poll() is None:
            line = proc.stdout.readline()
            if "reward server" in line:
                break
        m = re.search(r"url=(\S+)", line)
        assert m, f"no 'url=' line from the reward server (got {line!r}, rc={proc.poll()})"
        yield m.group(1)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_remote_reward_survives_timeout_and_equals_task_reward(grpo_hf_reference, reward_url,
                                                              tmp_path, rl_job):
    ref = grpo_hf_reference
    job = rl_job(tmp_path / "remote",
                 [*ref.overrides, f"train.num_steps={STEPS}", "reward.source=remote",
                  f"reward.remote_url={reward_url}", f"reward.remote_timeout_s={TIMEOUT_S}"])
    rows, want = job.metrics, ref.by_step()
    assert [m["step"] for m in rows] == list(range(1, STEPS + 1))
    # The injected hang: step 1 waited out one client timeout before its retry succeeded.
    assert rows[0]["time/reward"] >= TIMEOUT_S, rows[0]["time/reward"]
    for m in rows:
        for key in ("reward/mean", "reward/std", "loss/policy"):
            assert m[key] == pytest.approx(want[m["step"]][key], abs=1e-6), (
                f"step {m['step']} {key}: remote {m[key]} vs task reward {want[m['step']][key]}")


# The built-in repeat reward, written the way an OpenRLHF user writes a reward_func.py: the
# response is what follows the prompt in the query, special tokens included, so the file strips
# the tokenizer's special tokens itself.
OPENRLHF_REPEAT = '''
from hpc_rlhf.models.tiny import SPECIAL_TOKENS

def reward_func(queries, prompts, labels, **kwargs):
    rewards, lengths = [], []
    for query, prompt, label in zip(queries, prompts, labels):
        assert query.startswith(prompt) and prompt.endswith("<|assistant|>"), (query, prompt)
        text = query[len(prompt):]
        for special in SPECIAL_TOKENS:
            text = text.replace(special, "")
        text = text.strip()
        rewards.append(sum(c == label for c in text) / max(len(text), 8))
        lengths.append(float(len(text)))
    return {"rewards": rewards, "extra_logs": {"chars": lengths}}
'''


def test_openrlhf_style_reward_func_trains_as_the_task_reward(grpo_hf_reference, tmp_path,
                                                              rl_job):
    ref = grpo_hf_reference
    path = tmp_path / "reward_func.py"
    path.write_text(OPENRLHF_REPEAT)
    job = rl_job(tmp_path / "func", [*ref.overrides, "train.num_steps=2", "reward.source=func",
                                     f"reward.func_path={path}"])
    rows, want = job.metrics, ref.by_step()
    assert [m["step"] for m in rows] == [1, 2]
    for m in rows:
        for key in ("reward/mean", "reward/std", "loss/policy"):
            assert m[key] == pytest.approx(want[m["step"]][key], abs=1e-6), (
                f"step {m['step']} {key}: OpenRLHF-style func {m[key]} vs task reward "
                f"{want[m['step']][key]}")
        # extra_logs are logged: the character tokenizer makes each kept char one token.
        assert 0 < m["reward_extra/chars"] <= want[m["step"]]["rollout/response_len"] + 1e-6
