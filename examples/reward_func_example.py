"""An example reward file for `reward.source=func reward.func_path=examples/reward_func_example.py`.

The RL loop calls `reward_func` once per batch. Rewards here: 1.0 when the first number in the
response equals the label (built-in arithmetic task), plus a small format bonus for answering
with the number only. Return a list of floats, a 1-D tensor, or (as below) a dict with
"rewards" and optional "scores" (used for dynamic filtering) and "extra_logs" (logged as means).

Try it:  python examples/reward_func_example.py
"""
import re

_NUMBER = re.compile(r"-?\d+")


def reward_func(queries, responses, labels):
    correct, concise = [], []
    for response, label in zip(responses, labels):
        m = _NUMBER.search(response)
        correct.append(1.0 if m is not None and m.group() == label.strip() else 0.0)
        concise.append(1.0 if response.strip() == label.strip() else 0.0)
    rewards = [c + 0.1 * f for c, f in zip(correct, concise)]
    return {"rewards": rewards, "scores": correct, "extra_logs": {"concise": concise}}


if __name__ == "__main__":
    from hpc_rlhf.rewards import FuncReward, RewardBatch

    source = FuncReward(__file__)
    batch = RewardBatch.from_texts(["What is 3+4?"] * 3, ["7", "It is 7.", "8"], ["7", "7", "7"])
    rewards = source.score(batch)
    print("rewards", rewards.tolist(), "scores", source.last_scores.tolist(),
          "logs", source.last_logs)
