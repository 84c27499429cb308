"""Multi-turn agent episodes on the real HF engine and tiny model, checked against plain rebuilds.

References: the whole episode re-rendered as one chat conversation with the template (must equal
the token sequence built turn by turn), and the model's logprobs recomputed over the full
sequence in one forward pass (must equal the engine's at every model token).
"""
import textwrap

import pytest
import torch

from hpc_rlhf.models.tiny import ensure_tiny_model
from hpc_rlhf.rewards import RewardError
from hpc_rlhf.rewards.agent import load_agent_class, run_agent_episodes
from hpc_rlhf.rollout import HFEngine, SamplingConfig

pytestmark = pytest.mark.unit

LOGPROB_TOL = 1e-4  # float32, left-padded batch vs one unpadded forward
AGENT_FILE = """
class CountingEnv:
    log = []      # (label, turn, response_text, reward) for every step, across instances

    def reset(self, prompt, label):
        self.label, self.turn = label, 0
        return None if label != "2" else "Start: say something."

    def step(self, response_text):
        self.turn += 1
        reward = self.turn + len(response_text) / 100
        CountingEnv.log.append((self.label, self.turn, response_text, reward))
        return {"reward": reward, "observation": f"Feedback {self.turn}: again",
                "done": self.turn >= int(self.label)}
"""


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    path = ensure_tiny_model(tmp_path_factory.mktemp("models"))
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    return model, AutoTokenizer.from_pretrained(path)


class RecordingEngine:
    """The real HFEngine, remembering what it generated (to compare with the trajectories)."""

    def __init__(self, engine):
        self.engine, self.calls = engine, []

    def generate(self, prompt_token_ids, sampling):
        out = self.engine.generate(prompt_token_ids, sampling)
        self.calls.append(([list(p) for p in prompt_token_ids], out))
        return out


@pytest.fixture
def engine(tiny):
    model, tok = tiny
    return RecordingEngine(HFEngine(model, eos_token_ids=[tok.eos_token_id],
                                    pad_token_id=tok.pad_token_id, tokenizer=tok))


@pytest.fixture
def agent_cls(tmp_path):
    path = tmp_path / "env.py"
    path.write_text(textwrap.dedent(AGENT_FILE))
    return load_agent_class(f"{path}:CountingEnv")


def segments(mask):
    """(start, end) of each run of 1s."""
    out, start = [], None
    for t, m in enumerate(mask + [0]):
        if m and start is None:
            start = t
        if not m and start is not None:
            out.append((start, t))
            start = None
    return out


def naive_logprobs(model, ids):
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0].double()   # [T, v]
    lp = torch.log_softmax(logits[:-1], dim=-1)
    return lp.gather(-1, torch.tensor(ids[1:])[:, None]).squeeze(-1)       # [T-1]: token t+1


def test_chat_episodes_mask_tokens_logprobs_reward(tiny, engine, agent_cls):
    model, tok = tiny
    prompts, labels = ["Hi", "Go on", "Count"], ["1", "2", "5"]
    sampling = SamplingConfig(n=2, max_new_tokens=6, temperature=1.0, seed=0)
    trajs = run_agent_episodes(engine, tok, agent_cls, prompts, labels, sampling, max_turns=3)
    assert [(t.prompt_index, t.sample_index) for t in trajs] == [(i, j) for i in range(3)
                                                                 for j in range(2)]
    log = list(agent_cls.log)
    generated = [r for _, outs in engine.calls for r in outs]
    for t in trajs:
        label = labels[t.prompt_index]
        want_turns = min(int(label), 3)
        assert t.num_turns == want_turns                                      # max_turns=3
        assert t.finish_reason == ("done" if int(label) <= 3 else "max_turns")
        assert len(t.action_mask) == len(t.response_ids) == t.logprobs.numel()
        # The action mask covers exactly the engine's sampled tokens, turn by turn.
        assert segments(t.action_mask) == [s for s in t.turn_spans if s[1] > s[0]]
        turn_tokens = [t.response_ids[a:b] for a, b in t.turn_spans]
        for k, (a, b) in enumerate(t.turn_spans):
            ctx = t.prompt_ids + t.response_ids[:a]
            prompts_k, outs = engine.calls[k]          # turn k is the engine's k-th call
            match = [r for p, r in zip(prompts_k, outs)
                     if p == ctx and r.response_ids == turn_tokens[k]]
            assert match, f"turn {k} of episode {t.prompt_index}/{t.sample_index} not generated"
            assert torch.equal(t.logprobs[a:b], match[0].logprobs)
        assert torch.all(t.logprobs[torch.tensor(t.action_mask) == 0] == 0)
        # Naive rebuild: render the whole conversation once with a marker per assistant turn,
        # encode the text between markers, splice in the sampled tokens (the tiny model can
        # sample ids the tokenizer cannot decode, so the tokens do not round-trip via text).
        first = "Start: say something." if label == "2" else prompts[t.prompt_index]
        messages = [{"role": "user", "content": first}]
        for k in range(len(turn_tokens)):
            messages.append({"role": "assistant", "content": f"[[TURN{k}]]"})
            if k < len(turn_tokens) - 1:
                messages.append({"role": "user", "content": f"Feedback {k + 1}: again"})
        text = tok.apply_chat_template(messages, tokenize=False)
        rendered = []
        for k, toks in enumerate(turn_tokens):
            before, text = text.split(f"[[TURN{k}]]")
            rendered += tok(before, add_special_tokens=False)["input_ids"]
            rendered += toks[:-1] if toks and toks[-1] == tok.eos_token_id else toks
        rendered += tok(text, add_special_tokens=False)["input_ids"]   # the final "</s>"
        full = t.prompt_ids + t.response_ids
        ends_open = not turn_tokens[-1] or turn_tokens[-1][-1] != tok.eos_token_id
        assert full == (rendered[:-1] if ends_open else rendered)  # last turn: no eot appended
        fb = tok("Feedback 1: again", add_special_tokens=False)["input_ids"]
        if want_turns > 1:
            env_ids = [x for x, m in zip(t.response_ids, t.action_mask) if m == 0]
            assert any(env_ids[s:s + len(fb)] == fb for s in range(len(env_ids)))
        # Token-in-token-out: one forward over the final sequence gives the engine's logprobs.
        ref = naive_logprobs(model, full)[len(t.prompt_ids) - 1:]             # [len(response)]
        mask = torch.tensor(t.action_mask, dtype=torch.bool)
        assert (ref[mask].float() - t.logprobs[mask]).abs().max() < LOGPROB_TOL
        # The reward is the environment's last one, for the texts the model produced.
        last_text = tok.decode(turn_tokens[-1], skip_special_tokens=True)
        assert (label, want_turns, last_text, t.reward) in log
        assert t.reward == pytest.approx(want_turns + len(last_text) / 100)
        assert t.turn_rewards[-1] == t.reward
    assert len(log) == sum(t.num_turns for t in trajs)
    assert [len(outs) for _, outs in engine.calls] == [6, 4, 2]     # live episodes per turn
    assert any("length" in t.turn_finish_reasons[:-1] for t in trajs)  # eot added by the env
    assert sum(len(r.response_ids) for r in generated) == sum(sum(t.action_mask) for t in trajs)


def test_raw_text_episodes(tiny, engine, agent_cls):
    model, tok = tiny
    sampling = SamplingConfig(n=1, max_new_tokens=4, temperature=0.0)
    (t,) = run_agent_episodes(engine, tok, agent_cls, ["abc"], ["3"], sampling, max_turns=3,
                              apply_chat_template=False)
    enc = lambda s: tok(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    expect = []
    for k, (a, b) in enumerate(t.turn_spans):
        expect += t.response_ids[a:b]
        if k < 2:
            expect += enc(f"Feedback {k + 1}: again")
    assert t.prompt_ids == enc("abc") and t.response_ids == expect
    assert t.num_turns == 3 and t.finish_reason == "done"


def test_max_total_tokens_ends_episode(tiny, engine, agent_cls):
    model, tok = tiny
    sampling = SamplingConfig(n=1, max_new_tokens=5, temperature=0.0)
    (t,) = run_agent_episodes(engine, tok, agent_cls, ["x"], ["9"], sampling, max_turns=9,
                              max_total_tokens=40)
    assert t.finish_reason == "max_tokens" and 1 <= t.num_turns < 9
    assert len(t.prompt_ids) + len(t.response_ids) <= 40


@pytest.mark.parametrize("body, pattern", [
    ("return {'reward': 1.0, 'observation': '', 'done': 'yes'}", r"done='yes'"),
    ("return {'reward': float('nan'), 'observation': '', 'done': True}", r"reward=nan"),
    ("return [1.0]", r"returned list; return a dict"),
    ("raise KeyError('boom')", r"Bad.step raised KeyError: 'boom'"),
    ("return {'reward': None, 'observation': 'more', 'done': False}", r"gave no reward.*2 turns"),
])
def test_bad_agents_fail_clearly(tiny, engine, tmp_path, body, pattern):
    path = tmp_path / "bad.py"
    path.write_text("class Bad:\n    def reset(self, prompt, label):\n        return None\n"
                    f"    def step(self, text):\n        {body}\n")
    with pytest.raises(RewardError, match=pattern):
        run_agent_episodes(engine, tiny[1], load_agent_class(f"{path}:Bad"), ["q"], ["1"],
                           SamplingConfig(max_new_tokens=2, temperature=0.0), max_turns=2)


def test_load_agent_class_errors(tmp_path):
    path = tmp_path / "a.py"
    path.write_text("class A:\n    def reset(self, p, l):\n        return None\n")
    with pytest.raises(RewardError, match=r"no class 'AgentInstance' \(classes there: \['A'\]\);"
                                          r" name it as file.py:ClassName"):
        load_agent_class(str(path))          # no class named: OpenRLHF's AgentInstance
    with pytest.raises(RewardError, match=r"no class 'B' \(classes there: \['A'\]\)"):
        load_agent_class(f"{path}:B")
    with pytest.raises(RewardError, match=r"lacks \['step'\]"):
        load_agent_class(f"{path}:A")


def test_example_guess_number_agent(tiny, engine):
    from pathlib import Path
    example = Path(__file__).resolve().parents[2] / "examples" / "agent_example.py"
    cls = load_agent_class(f"{example}:GuessNumberAgent")
    env = cls()
    env.reset("guess", "7")
    assert env.step("I guess 3") == {"reward": 0.0, "observation": "Higher.", "done": False}
    assert env.step("10") == {"reward": 0.0, "observation": "Lower.", "done": False}
    assert env.step("no idea")["observation"] == "Answer with a number only."
    assert env.step("7") == {"reward": pytest.approx(0.4), "observation": "", "done": True}
    trajs = run_agent_episodes(engine, tiny[1], cls, ["Guess a number 1-20."] * 2, ["7", "12"],
                               SamplingConfig(n=1, max_new_tokens=3, seed=1), max_turns=2)
    assert all(t.num_turns in (1, 2) and 0.0 <= t.reward <= 1.0 for t in trajs)


# Written from OpenRLHF's documented agent interface (agent_func.py): the stand-in module must
# serve the import, `async __init__` and async reset/step take and return state dicts, feedback
# is raw text, and the episode's reward is the sum of the turns' rewards.
OPENRLHF_AGENT = '''
import torch
from openrlhf.utils.agent import AgentExecutorBase, AgentInstanceBase

SEEN = []

class AgentInstance(AgentInstanceBase):
    async def __init__(self, *args, **kwargs):
        self.step_idx = 0

    async def reset(self, states: dict, **kwargs):
        SEEN.append(("reset", dict(states)))
        return {"observation": states["observation"]}

    async def step(self, states: dict, **kwargs):
        SEEN.append(("step", dict(states)))
        self.step_idx += 1
        done = self.step_idx >= 2
        return {"rewards": torch.tensor(0.25 * self.step_idx), "scores": torch.tensor(1.0),
                "environment_feedback": "" if done else "\\nTry again.\\n", "done": done,
                "sampling_params": states.get("sampling_params"), "extra_logs": {}}


class AgentExecutor(AgentExecutorBase):
    def __init__(self, max_steps, max_length, llm_engine, hf_tokenizer, result_queue):
        super().__init__(AgentInstance, max_steps, max_length, llm_engine, hf_tokenizer,
                         result_queue)
'''


def test_openrlhf_agent_file_runs_unchanged(tmp_path, tiny, engine):
    from hpc_rlhf.data.chat import ChatFormat
    _, tok = tiny
    path = tmp_path / "agent_func.py"
    path.write_text(OPENRLHF_AGENT)
    cls = load_agent_class(str(path))                     # no ':Class': AgentInstance
    seen = cls.__init__.__globals__["SEEN"]
    trajs = run_agent_episodes(engine, tok, cls, ["Say hi.", "Count."], ["a", "b"],
                               SamplingConfig(n=1, max_new_tokens=5, temperature=1.0, seed=3),
                               max_turns=4)
    fmt = ChatFormat(tok)
    for k, t in enumerate(trajs):
        assert t.reward == pytest.approx(0.25 + 0.5)          # summed over the two turns
        assert t.num_turns == 2 and t.finish_reason == "done"
        prompt_text = tok.decode(fmt.prompt_ids(["Say hi.", "Count."][k]),
                                 skip_special_tokens=False)
        assert t.prompt_ids == fmt.encode(prompt_text)        # reset's observation, raw tokens
        (s1, e1), (s2, e2) = t.turn_spans
        feedback = t.response_ids[e1:s2]
        assert feedback == fmt.encode("\nTry again.\n")       # raw text, no chat template
        assert t.action_mask[e1:s2] == [0] * len(feedback)
    resets = [s for kind, s in seen if kind == "reset"]
    steps = [s for kind, s in seen if kind == "step" and s["label"] == "a"]   # episode 0
    assert resets[0] == {"observation": tok.decode(trajs[0].prompt_ids), "label": "a"}
    first_action = tok.decode(trajs[0].response_ids[:trajs[0].turn_spans[0][1]],
                              skip_special_tokens=True)
    assert steps[0]["action_text"] == first_action and steps[0]["label"] == "a"
    # The second step sees the whole text so far: observation + action + feedback.
    assert steps[1]["observation_text"] == (resets[0]["observation"] + first_action
                                            + "\nTry again.\n")


LOOP_AGENT = '''
import asyncio

LOOPS = []

class AgentInstance:
    async def reset(self, states, **kwargs):
        LOOPS.append(id(asyncio.get_running_loop()))
        return {"observation": states["observation"]}

    async def step(self, states, **kwargs):
        return {"rewards": 1.0, "environment_feedback": "", "done": True}
'''


def test_openrlhf_agents_share_one_event_loop_across_steps(tmp_path, tiny, engine):
    """Agents may keep loop-bound state (sessions, queues) between RL steps."""
    _, tok = tiny
    path = tmp_path / "loop_agent.py"
    path.write_text(LOOP_AGENT)
    cls = load_agent_class(str(path))
    for _ in range(2):                                    # two RL steps
        run_agent_episodes(engine, tok, cls, ["hi"], ["x"],
                           SamplingConfig(n=1, max_new_tokens=2, seed=1), max_turns=1)
    loops = cls.reset.__globals__["LOOPS"]
    assert len(loops) == 2 and loops[0] == loops[1]


def test_openrlhf_agents_need_no_turn_structure_from_the_template(tiny):
    """Their feedback is raw text: a template whose assistant turn does not start with its
    generation prompt (refused for our user-turn agents) is fine for them."""
    from hpc_rlhf.data.chat import TemplateError
    from hpc_rlhf.rewards.agent import TurnFormat
    _, tok = tiny
    odd = ("{% for m in messages %}{% if m['role'] == 'user' %}<|user|>{{ m['content'] }}"
           "{% else %}<|assistant|>\n{{ m['content'] }}</s>{% endif %}{% endfor %}"
           "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    with pytest.raises(TemplateError, match="does not render an assistant turn"):
        TurnFormat(tok, True, odd)
    turns = TurnFormat(tok, True, odd, user_turns=False)
    assert turns.prompt_ids("hi") == turns.fmt.encode("<|user|>hi<|assistant|>")
    plain = TurnFormat(tok, False, None, "Q: {}\nA: ")        # data.input_template reaches agents
    assert plain.prompt_ids("hi") == plain.fmt.encode("Q: hi\nA: ")
