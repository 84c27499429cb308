"""A verifiable multi-turn environment: guess the number, with "higher" / "lower" feedback.

Use it in a job with
    reward.source=agent reward.agent_path=examples/agent_example.py:GuessNumberAgent
and prompts whose label is the secret number (`make_prompts` builds some). Each episode: the
model guesses, the environment answers "Higher." / "Lower." as the next user turn, until the
guess is right (reward 1.0 - 0.2 per extra turn, at least 0.2) or the turns run out (0.0).

Run it (tiny random model, so expect nonsense guesses; a trained policy learns to bisect):
    python examples/agent_example.py
"""
import random
import re

LOW, HIGH = 1, 20
_NUMBER = re.compile(r"-?\d+")


class GuessNumberAgent:
    """One instance per episode (hpc_rlhf.rewards.agent's reset/step interface)."""

    def reset(self, prompt: str, label: str):
        self.secret = int(label)
        self.turns = 0
        return None  # keep the dataset prompt as the first user message

    def step(self, response_text: str) -> dict:
        self.turns += 1
        m = _NUMBER.search(response_text)
        if m is None:
            return {"reward": 0.0, "observation": "Answer with a number only.", "done": False}
        guess = int(m.group())
        if guess == self.secret:
            reward = max(1.0 - 0.2 * (self.turns - 1), 0.2)
            return {"reward": reward, "observation": "", "done": True}
        hint = "Higher." if guess < self.secret else "Lower."
        return {"reward": 0.0, "observation": hint, "done": False}


def make_prompts(num: int, seed: int = 0) -> tuple[list[str], list[str]]:
    """(prompts, labels): labels are the secret numbers."""
    rng = random.Random(seed)
    prompt = (f"I am thinking of a number between {LOW} and {HIGH}. Guess it; answer with the "
              "number only.")
    return [prompt] * num, [str(rng.randint(LOW, HIGH)) for _ in range(num)]


def main():
    import tempfile

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hpc_rlhf.models.tiny import ensure_tiny_model
    from hpc_rlhf.rewards.agent import run_agent_episodes
    from hpc_rlhf.rollout import HFEngine, SamplingConfig

    path = ensure_tiny_model(tempfile.gettempdir() + "/hpc_rlhf_models")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(path)
    engine = HFEngine(model, eos_token_ids=[tok.eos_token_id], pad_token_id=tok.pad_token_id)
    prompts, labels = make_prompts(2)
    trajectories = run_agent_episodes(engine, tok, GuessNumberAgent, prompts, labels,
                                      SamplingConfig(n=2, max_new_tokens=6, seed=0), max_turns=3)
    for t in trajectories:
        print(f"prompt {t.prompt_index} sample {t.sample_index}: {t.num_turns} turns, "
              f"{sum(t.action_mask)} model / {len(t.action_mask) - sum(t.action_mask)} env "
              f"tokens, reward {t.reward}, {t.finish_reason}")
        print("   ", repr(tok.decode(t.prompt_ids + t.response_ids)))


if __name__ == "__main__":
    main()
