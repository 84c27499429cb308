"""Reward functions written for OpenRLHF run unchanged: what they are called with (the texts the
model saw), how their parameters are matched (by name, never by position), and what they may
return (scores for dynamic filtering, extra_logs of any numeric scalar type).

The files below are written from OpenRLHF's documented interface: `reward_func(queries, prompts,
labels)`, queries = prompt + response as the model saw them."""
import textwrap
from dataclasses import dataclass

import numpy as np
import pytest
import torch

from hpc_rlhf.config import config_from_dict
from hpc_rlhf.models.tiny import build_tokenizer
from hpc_rlhf.recipes.rl.prompts import Prompt
from hpc_rlhf.recipes.rl.step import score_rollouts
from hpc_rlhf.rewards import FuncReward, RewardBatch, RewardError, reward_batch

pytestmark = pytest.mark.unit

# A math reward as OpenRLHF users write it: cut the prompt off the query, read the last \boxed{}.
MATH_OPENRLHF = r'''
import re
import torch

def reward_func(queries, prompts, labels, **kwargs):
    rewards = []
    for query, prompt, label in zip(queries, prompts, labels):
        response = query[len(prompt):]
        found = re.findall(r"\\boxed\{([^{}]*)\}", response)
        rewards.append(1.0 if found and found[-1].strip() == label.strip() else 0.0)
    return {"rewards": torch.tensor(rewards), "scores": torch.tensor(rewards),
            "extra_logs": {"boxed": torch.tensor([float("boxed" in q) for q in queries])}}
'''


@dataclass
class Episode:  # the two fields score_rollouts reads of a collect.Episode / rollout.Rollout
    prompt_index: int
    response_ids: list


def write(tmp_path, body: str, name: str = "reward_func.py"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(body))
    return path


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def chat_prompt(tok, text: str, label: str) -> Prompt:
    ids = tok.apply_chat_template([{"role": "user", "content": text}], tokenize=True,
                                  add_generation_prompt=True)
    ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    return Prompt(list(ids), text, label)


def test_reward_batch_holds_the_texts_the_model_saw(tok):
    p = chat_prompt(tok, "What is 3+4?", "7")
    response = tok("The answer is 7.", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    b = reward_batch(tok, [p.ids], [response], [p.text], [p.label])
    assert b.prompts == ["<|user|>What is 3+4?<|assistant|>"]          # template applied
    assert b.queries == ["<|user|>What is 3+4?<|assistant|>The answer is 7.</s>"]
    assert b.responses == ["The answer is 7."]                          # special tokens removed
    assert b.messages == ["What is 3+4?"] and b.labels == ["7"]


def test_openrlhf_math_reward_scores_a_correct_boxed_answer_1_in_an_rl_step(tmp_path, tok):
    cfg = config_from_dict({"reward": {"source": "func",
                                       "func_path": str(write(tmp_path, MATH_OPENRLHF))},
                            "data": {"prompts": "x.jsonl"}})
    source = FuncReward(cfg.reward.func_path)
    assert source.style == "openrlhf"
    prompts = [chat_prompt(tok, "What is 3+4? Answer in \\boxed{}.", "7"),
               chat_prompt(tok, "What is 2+2? Answer in \\boxed{}.", "4")]
    texts = ["So \\boxed{7}", "\\boxed{8}", "It is \\boxed{4}.", "no box 4"]
    episodes = [Episode(i // 2, tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id])
                for i, t in enumerate(texts)]
    rewards, scores, logs = score_rollouts(cfg, source, tok, prompts, episodes)
    # The prompt's own "\boxed{}" must not count: the function cuts the prompt off the query.
    assert rewards.tolist() == [1.0, 0.0, 1.0, 0.0]
    assert scores.tolist() == [1.0, 0.0, 1.0, 0.0]
    assert logs == {"reward_extra/boxed": 1.0}


def test_scores_are_the_rewards_when_not_returned(tmp_path, tok):
    path = write(tmp_path, "def reward_func(queries, prompts, labels):\n"
                           "    return [float(len(q) - len(p))\n"
                           "            for q, p in zip(queries, prompts)]\n")
    cfg = config_from_dict({"reward": {"source": "func", "func_path": str(path)},
                            "data": {"prompts": "x.jsonl"}})
    prompts = [chat_prompt(tok, "hi", "")]
    episodes = [Episode(0, tok("abc", add_special_tokens=False)["input_ids"])]
    rewards, scores, logs = score_rollouts(cfg, FuncReward(path), tok, prompts, episodes)
    assert rewards.tolist() == [3.0] and torch.equal(scores, rewards) and logs == {}


@pytest.mark.parametrize("signature, style", [
    ("queries, prompts, labels", "openrlhf"),
    ("queries, prompts, labels, **kwargs", "openrlhf"),
    ("prompts, labels, queries", "openrlhf"),             # order does not matter
    ("queries, labels", "openrlhf"),
    ("queries, prompts, labels, scale=2.0", "openrlhf"),  # a defaulted extra stays default
    ("queries, responses, labels", "ours"),
    ("labels, responses, queries", "ours"),
    ("queries, responses, labels, prompts", "ours"),
])
def test_parameters_are_matched_by_name(tmp_path, signature, style):
    path = write(tmp_path, f"""
        SEEN = []
        def reward_func({signature}):
            SEEN.append({{k: v for k, v in locals().items() if k != "kwargs"}})
            return [0.5] * len(labels)
    """)
    source = FuncReward(path)
    batch = RewardBatch.from_texts(["M"], ["R"], ["L"], prompts=["P"])
    assert source.score(batch).tolist() == [0.5] and source.style == style
    seen = source.fn.__globals__["SEEN"][0]
    want = {"queries": "PR" if style == "openrlhf" else "M", "prompts": "P", "responses": "R",
            "labels": "L", "scale": 2.0}
    assert {k: v if k == "scale" else v[0] for k, v in seen.items()} == \
        {k: want[k] for k in seen}


@pytest.mark.parametrize("signature", ["q, r, l", "queries, prompts, labels, /", "",
                                       "queries, answers"])
def test_unfillable_parameters_are_refused_with_both_signatures(tmp_path, signature):
    path = write(tmp_path, f"def reward_func({signature}):\n    return []\n")
    with pytest.raises(RewardError, match=r"cannot fill.*reward_func\(queries, prompts, labels\)"
                                          r".*reward_func\(queries, responses, labels\)"):
        FuncReward(path)


def test_star_args_get_openrlhf_order(tmp_path):
    path = write(tmp_path, "def reward_func(*args):\n"
                           "    q, p, l = args\n"
                           "    return [float(q[0] == 'P+R' and p[0] == 'P' and l[0] == 'L')]\n")
    batch = RewardBatch.from_texts(["M"], ["+R"], ["L"], prompts=["P"])
    assert FuncReward(path).score(batch).tolist() == [1.0]


@pytest.mark.parametrize("value", ["torch.tensor(0.25)", "np.float32(0.25)", "np.float64(0.25)",
                                   "np.array(0.25)", "0.25", "np.int64(1) / 4",
                                   "torch.tensor([0.0, 0.5])", "np.array([0.0, 0.5])",
                                   "[0.0, 0.5]"])
def test_extra_logs_accept_any_numeric_scalar_or_vector(tmp_path, value):
    path = write(tmp_path, f"""
        import numpy as np
        import torch
        def reward_func(queries, prompts, labels):
            return {{"rewards": [1.0, 0.0], "extra_logs": {{"x": {value}}}}}
    """)
    source = FuncReward(path)
    source.score(RewardBatch.from_texts(["a", "b"], ["1", "2"], ["", ""]))
    assert source.last_logs == {"x": pytest.approx(0.25)}


@pytest.mark.parametrize("value, pattern", [("'high'", r"extra_logs\['x'\]\) returned str 'high'"),
                                            ("True", r"extra_logs\['x'\]\) returned bool True"),
                                            ("float('nan')", r"returned nan")])
def test_extra_logs_refuse_non_numbers(tmp_path, value, pattern):
    path = write(tmp_path, "def reward_func(queries, prompts, labels):\n"
                           f"    return {{'rewards': [1.0], 'extra_logs': {{'x': {value}}}}}\n")
    with pytest.raises(RewardError, match=pattern):
        FuncReward(path).score(RewardBatch.from_texts(["a"], ["1"], [""]))


def test_numpy_array_of_rewards(tmp_path):
    path = write(tmp_path, "import numpy as np\n"
                           "def reward_func(queries, prompts, labels):\n"
                           "    return np.array([0.5, 1.5], dtype=np.float32)\n")
    got = FuncReward(path).score(RewardBatch.from_texts(["a", "b"], ["1", "2"], ["", ""]))
    assert got.tolist() == [0.5, 1.5]
    assert np.float32(1.0) == 1.0  # numpy is a hard dependency: imported plainly above
