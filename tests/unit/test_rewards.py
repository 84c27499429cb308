"""Reward sources: built-in tasks, user reward_func.py files (good and bad), the config factory."""
import math
import textwrap
from pathlib import Path

import numpy as np  # a hard dependency (setup.cfg): a missing one must fail, not skip
import pytest
import torch

from hpc_rlhf.rewards.base import RewardBatch
from hpc_rlhf.config import config_from_dict
from hpc_rlhf.data.tasks import make_task, task_reward
from hpc_rlhf.rewards import (FuncReward, RemoteReward, RewardError, RewardSource, TaskReward,
                              as_reward_tensor, build_reward_source)

pytestmark = pytest.mark.unit

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "reward_func_example.py"


def write(tmp_path, body: str, name="reward_func.py") -> Path:
    p = tmp_path / name
    p.write_text(textwrap.dedent(body))
    return p


@pytest.mark.parametrize("task", ["arithmetic", "repeat", "copy"])
def test_task_reward_matches_per_sample_reference(task):
    samples = make_task(f"task:{task}", 20, seed=1)
    responses = [s.answer if i % 2 else s.answer[::-1] + "x" for i, s in enumerate(samples)]
    labels = [s.label for s in samples]
    batch = RewardBatch.from_texts([s.prompt for s in samples], responses, labels)
    got = TaskReward(f"task:{task}").score(batch)
    ref = [task_reward(task)(r, lab) for r, lab in zip(responses, labels)]
    assert isinstance(TaskReward(task), RewardSource)
    assert got.dtype == torch.float32 and got.shape == (20,)
    assert torch.allclose(got, torch.tensor(ref), atol=1e-7)


def test_task_reward_unknown_task_and_ragged_batch():
    with pytest.raises(ValueError, match="unknown task 'nope'"):
        TaskReward("task:nope")
    with pytest.raises(ValueError, match=r"RewardBatch lists differ in length .*'responses': 1"):
        RewardBatch(["a", "b"], ["1"], ["a", "b"], ["a1", "b"], ["1", "2"])


@pytest.mark.parametrize("ret", [
    "[float(len(r)) for r in responses]",
    "torch.tensor([float(len(r)) for r in responses])",
    "torch.tensor([[float(len(r))] for r in responses])",          # [B, 1]
    "[len(r) for r in responses]",                                  # ints are numbers
    '{"rewards": [float(len(r)) for r in responses]}',
])
def test_func_reward_return_forms(tmp_path, ret):
    path = write(tmp_path, f"""
        import torch
        def reward_func(queries, responses, labels):
            return {ret}
    """)
    got = FuncReward(path).score(RewardBatch.from_texts(["q"] * 3, ["a", "bbb", ""], ["", "", ""]))
    assert got.dtype == torch.float32 and got.tolist() == [1.0, 3.0, 0.0]


def test_example_file_dict_with_scores_and_logs():
    src = FuncReward(EXAMPLE)
    got = src.score(RewardBatch.from_texts(["What is 3+4?"] * 3, ["7", "It is 7.", "8"],
                                           ["7", "7", "7"]))
    assert torch.allclose(got, torch.tensor([1.1, 1.0, 0.0]))
    assert src.last_scores.tolist() == [1.0, 1.0, 0.0]
    assert src.last_logs == {"concise": pytest.approx(1 / 3)}


@pytest.mark.parametrize("ret, pattern", [
    ("[1.0]", r"returned 1 rewards for a batch of 2 samples"),
    ("[1.0, float('nan')]", r"returned nan at index 1.*finite"),
    ("[float('inf'), 1.0]", r"returned inf at index 0"),
    ("['1.0', 2.0]", r"non-number at index 0: '1.0' \(str\)"),
    ("[None, 2.0]", r"non-number at index 0: None"),
    ("[True, 2.0]", r"non-number at index 0: True \(bool\)"),
    ("3.0", r"returned float 3.0; it must return a list of 2 floats"),
    ("None", r"returned NoneType None"),
    ('{"score": [1.0, 2.0]}', r"dict with keys \['score'\] but no 'rewards'"),
    ('{"rewards": [1.0, 2.0], "scores": [1.0]}', r"\('scores'\) returned 1 rewards"),
])
def test_func_reward_bad_returns_name_file_value_and_fix(tmp_path, ret, pattern):
    path = write(tmp_path, f"""
        def reward_func(queries, responses, labels):
            return {ret}
    """)
    with pytest.raises(RewardError, match=pattern) as e:
        FuncReward(path).score(RewardBatch.from_texts(["q", "q"], ["a", "b"], ["", ""]))
    assert str(path) in str(e.value) and "Fix " in str(e.value)


def test_func_reward_that_raises_names_file_and_exception(tmp_path):
    path = write(tmp_path, """
        def reward_func(queries, responses, labels):
            return [1.0 / 0 for _ in responses]
    """)
    with pytest.raises(RewardError, match=r"reward_func in .*reward_func.py raised "
                                          r"ZeroDivisionError: float division by zero") as e:
        FuncReward(path).score(RewardBatch.from_texts(["q"], ["a"], [""]))
    assert isinstance(e.value.__cause__, ZeroDivisionError)


def test_func_file_problems_are_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="is not a file"):
        FuncReward(tmp_path / "missing.py")
    bad = write(tmp_path, "def reward_func(:\n", "broken.py")
    with pytest.raises(RewardError, match=r"broken.py': executing it raised SyntaxError"):
        FuncReward(bad)
    other = write(tmp_path, "def score(q, r, l):\n    return [0.0] * len(r)\n", "other.py")
    with pytest.raises(RewardError, match=r"defines no function 'reward_func' \(it defines "
                                          r"\['score'\]\)"):
        FuncReward(other)


def test_func_file_is_loaded_by_path_only(tmp_path, monkeypatch):
    # A module named like the user's file elsewhere on sys.path must not be picked up instead.
    decoy = tmp_path / "decoy"
    decoy.mkdir()
    write(decoy, "def reward_func(queries, responses, labels):\n    return [-1.0] * len(queries)\n",
          "reward_func.py")
    monkeypatch.syspath_prepend(str(decoy))
    real = tmp_path / "real"
    real.mkdir()
    path = write(real, "def reward_func(queries, prompts, labels):\n    return [2.0] * len(queries)\n",
                 "reward_func.py")
    assert FuncReward(path).score(RewardBatch.from_texts(["q"], ["a"], [""])).tolist() == [2.0]


def test_as_reward_tensor_accepts_numpy_and_rejects_2d():
    assert as_reward_tensor(np.array([1, 2.5]), 2, source="s", fix="f").tolist() == [1.0, 2.5]
    with pytest.raises(RewardError, match=r"shape \(2, 2\)"):
        as_reward_tensor(torch.zeros(2, 2), 2, source="s", fix="f")
    assert math.isclose(as_reward_tensor([torch.tensor(0.5)], 1, source="s", fix="f").item(), 0.5)


def test_build_reward_source_from_config(tmp_path):
    cfg = config_from_dict({})
    assert isinstance(build_reward_source(cfg), TaskReward)
    cfg = config_from_dict({"reward": {"source": "func", "func_path": str(EXAMPLE)}})
    assert isinstance(build_reward_source(cfg), FuncReward)
    cfg = config_from_dict({"data": {"prompts": "x.jsonl"}, "reward": {
        "source": "remote", "remote_url": "http://127.0.0.1:9/s", "remote_timeout_s": 3.0,
        "remote_retries": 1}})
    rr = build_reward_source(cfg)
    assert isinstance(rr, RemoteReward) and (rr.timeout_s, rr.retries) == (3.0, 1)
    agent = write(tmp_path, "class Agent:\n    pass\n", "agent.py")
    cfg = config_from_dict({"reward": {"source": "agent", "agent_path": f"{agent}:Agent"}})
    with pytest.raises(ValueError, match="run_agent_episodes"):
        build_reward_source(cfg)
