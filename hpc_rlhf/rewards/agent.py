"""Multi-turn agents: a user environment class driving token-in-token-out rollouts.

`reward.source=agent reward.agent_path=path/to/file.py:ClassName`. The class (one instance per
episode, built with no arguments) implements

    reset(prompt: str, label: str) -> str | None
        The first user message; None keeps the dataset prompt. ({"observation": str} also works.)
    step(response_text: str) -> {"reward": float | None, "observation": str, "done": bool}
        Called after every model turn with that turn's text. "observation" is the environment's
        feedback, appended as the next user turn (or raw text); "reward" None means "no reward
        yet". OpenRLHF's key names "rewards" and "environment_feedback" are accepted too.

`run_agent_episodes` keeps each episode as one token sequence that is never re-tokenized: the
prompt, then each model turn's sampled tokens (action_mask 1, engine logprobs kept) and each
feedback's tokens (action_mask 0, logprob 0). With a chat template the feedback is rendered as
a user turn, preceded by whatever end-of-turn tokens of the template the model did not emit
itself (e.g. after a response cut at max_new_tokens). An episode ends when step says done, after
`max_turns` model turns, or when feedback + another turn would pass `max_total_tokens` (the
unused feedback is dropped, so a trajectory always ends on model tokens). Its reward is the last
non-None reward step returned; an episode that never got one is an error, not a 0.

OpenRLHF's agent files run unchanged (`reward.agent_path=agent_func.py`, class AgentInstance
by default): a class whose `step` is async or takes a `states` dict is driven as OpenRLHF drives
it. reset({"observation": the prompt as the model sees it (chat template applied), "label"})
returns {"observation": text}, whose tokens start the episode; after each model turn
step({"observation_text", "action_text", "label", "sampling_params": None}) returns "rewards",
"environment_feedback" (appended as raw text, no chat template) and "done"; the episode's
reward is the sum of the turns' rewards, as OpenRLHF sums them. Their `from openrlhf.utils.agent
import AgentInstanceBase, AgentExecutorBase` is served by a small stand-in module when OpenRLHF
is not installed (the executor is never used here: this loop drives the episodes).

Assumption: the template renders a user turn after an assistant turn the same whatever the
earlier contents (true of the usual templates; one that rewrites earlier turns, e.g. stripping
past <think> blocks, still yields a valid sequence, but not the one a re-render would give).
See examples/agent_example.py.
"""
from __future__ import annotations

import asyncio
import importlib.util
import inspect
import math
import sys
import types
from dataclasses import dataclass, field, replace

import torch

from hpc_rlhf.data.chat import ChatFormat, TemplateError
from hpc_rlhf.rewards.base import RewardError
from hpc_rlhf.rewards.func import load_user_module
from hpc_rlhf.rollout.protocol import RolloutEngine, SamplingConfig


@dataclass
class Trajectory:
    """One episode: prompt_ids, then response_ids mixing model (mask 1) and env (mask 0) tokens."""

    prompt_index: int
    sample_index: int
    prompt_ids: list[int]
    response_ids: list[int]
    action_mask: list[int]                 # [len(response_ids)] 1 = sampled by the model
    logprobs: torch.Tensor                 # [len(response_ids)] float32, 0 at env tokens
    reward: float                          # the episode's final reward (from the environment)
    turn_rewards: list = field(default_factory=list)   # step()'s reward per turn (None allowed)
    turn_spans: list = field(default_factory=list)     # (start, end) of each model turn
    finish_reason: str = "done"            # "done" | "max_turns" | "max_tokens"
    turn_finish_reasons: list = field(default_factory=list)  # the engine's, per model turn

    @property
    def num_turns(self) -> int:
        return len(self.turn_spans)


OPENRLHF_CLASS = "AgentInstance"  # the class OpenRLHF's --agent_func_path files define


def load_agent_class(spec: str):
    """'path/to/file.py:ClassName' (or 'path/to/file.py' for OpenRLHF's AgentInstance) -> the
    class (the file is loaded by that path only)."""
    path, sep, name = spec.rpartition(":")
    if not sep:
        path, name = spec, OPENRLHF_CLASS
    if not path or not name:
        raise ValueError(f"reward.agent_path={spec!r} must look like path/to/file.py:ClassName")
    _provide_openrlhf_agent_base()
    module = load_user_module(path, "reward.agent_path")
    cls = getattr(module, name, None)
    if not isinstance(cls, type):
        classes = sorted(k for k, v in vars(module).items() if isinstance(v, type))
        raise RewardError(f"reward.agent_path={spec!r}: {path} defines no class {name!r} "
                          f"(classes there: {classes}); name it as file.py:ClassName")
    missing = [m for m in ("reset", "step") if not callable(getattr(cls, m, None))]
    if missing:
        raise RewardError(f"reward.agent_path={spec!r}: class {name} lacks {missing}; an agent "
                          "needs reset(prompt, label) and step(response_text)")
    return cls


def is_openrlhf_agent(cls) -> bool:
    """OpenRLHF's interface: async step, or step(states: dict) by its parameter name."""
    step = getattr(cls, "step")
    if inspect.iscoroutinefunction(step):
        return True
    params = [p for p in inspect.signature(step).parameters if p != "self"]
    return bool(params) and params[0] in ("states", "state_dict")


def _provide_openrlhf_agent_base() -> None:
    """Make `from openrlhf.utils.agent import AgentInstanceBase, AgentExecutorBase` work in an
    agent file when OpenRLHF is not installed (the real module is used when it is)."""
    if "openrlhf.utils.agent" in sys.modules or importlib.util.find_spec("openrlhf") is not None:
        return

    class AgentInstanceBase:
        async def reset(self, states: dict, **kwargs):
            return states

        async def step(self, states: dict, **kwargs):
            raise NotImplementedError("AgentInstance.step is not implemented")

    class AgentExecutorBase:
        def __init__(self, *args, **kwargs):
            pass  # OpenRLHF's Ray executor: hpc_rlhf's loop drives episodes itself

    from importlib.machinery import ModuleSpec
    for name in ("openrlhf", "openrlhf.utils", "openrlhf.utils.agent"):
        module = types.ModuleType(name, "hpc_rlhf stand-in for agent files written for OpenRLHF")
        module.__spec__ = ModuleSpec(name, None)
        sys.modules[name] = module
    sys.modules["openrlhf"].utils = sys.modules["openrlhf.utils"]
    sys.modules["openrlhf.utils"].agent = sys.modules["openrlhf.utils.agent"]
    agent = sys.modules["openrlhf.utils.agent"]
    agent.AgentInstanceBase, agent.AgentExecutorBase = AgentInstanceBase, AgentExecutorBase


class TurnFormat:
    """Token pieces between turns, derived once from the chat template (or raw text)."""

    def __init__(self, tokenizer, apply_chat_template: bool = True,
                 chat_template: str | None = None, input_template: str | None = None,
                 user_turns: bool = True):
        """user_turns=False: feedback is raw text (OpenRLHF's agents), so the template's turn
        structure is neither probed nor required."""
        self.fmt = ChatFormat(tokenizer, apply_chat_template, chat_template, input_template)
        self.tokenizer = tokenizer
        self.eot: list[int] = []
        if apply_chat_template and user_turns:
            self._probe = [{"role": "user", "content": "P"}, {"role": "assistant", "content": "R"}]
            gen = self.fmt.encode(self.fmt.render(self._probe[:1], add_generation_prompt=True))
            self._after_assistant = self.fmt.encode(self.fmt.render(self._probe, False))
            body = gen + self.fmt.encode("R")
            if self._after_assistant[:len(body)] != body:
                raise TemplateError("the chat template does not render an assistant turn as "
                                    "generation prompt + content + end-of-turn tokens, so "
                                    "multi-turn token sequences cannot be built; use a "
                                    "prefix-stable template or data.apply_chat_template=false")
            self.eot = self._after_assistant[len(body):]  # e.g. [</s>] or [<|im_end|>, \n]

    def prompt_ids(self, text: str) -> list[int]:
        return self.fmt.prompt_ids(text)

    def feedback_ids(self, response_ids: list[int], observation: str) -> list[int]:
        """Env tokens after a model turn: missing end-of-turn tokens + the user turn + prompt."""
        if not self.fmt.apply_chat_template:
            return self.fmt.encode(observation)
        done = max((k for k in range(len(self.eot), 0, -1)
                    if response_ids[-k:] == self.eot[:k]), default=0)
        full = self.fmt.encode(self.fmt.render(
            self._probe + [{"role": "user", "content": observation}], add_generation_prompt=True))
        if full[:len(self._after_assistant)] != self._after_assistant:
            raise TemplateError("the chat template renders a user turn after an assistant turn "
                                "in a way that changes the earlier tokens; use a prefix-stable "
                                "template or data.apply_chat_template=false")
        return self.eot[done:] + full[len(self._after_assistant):]


@dataclass
class _Episode:
    agent: object
    prompt_index: int
    sample_index: int
    label: str
    prompt_ids: list[int]
    ids: list[int] = field(default_factory=list)
    mask: list[int] = field(default_factory=list)
    logprobs: list[torch.Tensor] = field(default_factory=list)
    rewards: list = field(default_factory=list)
    spans: list = field(default_factory=list)
    reasons: list = field(default_factory=list)
    finish: str = ""
    text: str = ""            # OpenRLHF agents: the observation text so far


class _Driver:
    """Our interface: sync reset(prompt, label) / step(response_text); last reward counts."""

    sums_rewards = False

    def __init__(self, agent_cls, turns: "TurnFormat", tokenizer):
        self.cls, self.turns, self.tokenizer = agent_cls, turns, tokenizer
        self.name = getattr(agent_cls, "__name__", str(agent_cls))

    def start(self, i: int, j: int, prompt: str, label: str) -> _Episode:
        agent = _call(self.name, "__init__", self.cls)
        first = _call(self.name, "reset", agent.reset, prompt, label)
        if isinstance(first, dict):
            first = first.get("observation")
        if first is not None and not isinstance(first, str):
            raise RewardError(f"agent {self.name}.reset returned {type(first).__name__}; return "
                              "the first user message (str) or None to keep the prompt")
        return _Episode(agent, i, j, label, self.turns.prompt_ids(first or prompt))

    def step(self, e: _Episode, response_ids: list[int], turn: int):
        """(reward or None, feedback token ids, done) after a model turn."""
        text = self.tokenizer.decode(response_ids, skip_special_tokens=True)
        out = _call(self.name, "step", e.agent.step, text)
        reward, observation, done = _step(self.name, e, out, turn)
        return reward, [] if done else self.turns.feedback_ids(response_ids, observation), done


class _OpenRLHFDriver(_Driver):
    """OpenRLHF's interface: async reset(states) / step(states) dicts, raw-text observations,
    rewards summed over turns (see the module doc)."""

    sums_rewards = True

    def __init__(self, agent_cls, turns: "TurnFormat", tokenizer):
        super().__init__(agent_cls, turns, tokenizer)
        self.loop = _agent_loop()

    def _run(self, method: str, value):
        try:
            return self.loop.run_until_complete(value) if inspect.isawaitable(value) else value
        except Exception as e:
            raise RewardError(f"agent {self.name}.{method} raised {type(e).__name__}: {e}; fix "
                              "the agent class (the traceback above shows where)") from e

    def _new(self):
        agent = self.cls.__new__(self.cls)
        init = _call(self.name, "__init__", self.cls.__init__, agent)  # may be `async def`
        self._run("__init__", init)
        return agent

    def start(self, i: int, j: int, prompt: str, label: str) -> _Episode:
        agent = self._new()
        shown = self.tokenizer.decode(self.turns.prompt_ids(prompt), skip_special_tokens=False)
        out = self._run("reset", _call(self.name, "reset", agent.reset,
                                       {"observation": shown, "label": label}))
        text = out.get("observation") if isinstance(out, dict) else None
        if not isinstance(text, str):
            raise RewardError(f"agent {self.name}.reset returned {out!r}; an OpenRLHF-style "
                              'agent returns {"observation": text}')
        e = _Episode(agent, i, j, label, self.turns.fmt.encode(text))
        e.text = text
        return e

    def step(self, e: _Episode, response_ids: list[int], turn: int):
        action = self.tokenizer.decode(response_ids, skip_special_tokens=True)
        states = {"observation_text": e.text, "action_text": action, "label": e.label,
                  "sampling_params": None}
        out = self._run("step", _call(self.name, "step", e.agent.step, states))
        reward, feedback, done = _step(self.name, e, out, turn)
        e.text += action + feedback
        return reward, [] if done else self.turns.fmt.encode(feedback), done



_LOOP: list = []  # one event loop per process: agents may keep loop-bound state across steps


def _agent_loop() -> asyncio.AbstractEventLoop:
    """The process's agent event loop (created once, set as this thread's current loop so a
    sync __init__ creating aiohttp sessions or queues binds to it)."""
    if not _LOOP or _LOOP[0].is_closed():
        _LOOP[:] = [asyncio.new_event_loop()]
    asyncio.set_event_loop(_LOOP[0])
    return _LOOP[0]


def run_agent_episodes(engine: RolloutEngine, tokenizer, agent_cls, prompts: list[str],
                       labels: list[str], sampling: SamplingConfig, max_turns: int, *,
                       apply_chat_template: bool = True, chat_template: str | None = None,
                       max_total_tokens: int | None = None,
                       input_template: str | None = None) -> list[Trajectory]:
    """sampling.n episodes per prompt (prompt-major); all live episodes generate together."""
    if len(prompts) != len(labels):
        raise ValueError(f"{len(prompts)} prompts but {len(labels)} labels")
    if max_turns < 1:
        raise ValueError(f"max_turns={max_turns} must be >= 1 (reward.max_turns)")
    openrlhf = is_openrlhf_agent(agent_cls)
    turns = TurnFormat(tokenizer, apply_chat_template, chat_template, input_template,
                       user_turns=not openrlhf)
    driver = (_OpenRLHFDriver if openrlhf else _Driver)(agent_cls, turns, tokenizer)
    episodes = [driver.start(i, j, prompt, label)
                for i, (prompt, label) in enumerate(zip(prompts, labels))
                for j in range(sampling.n)]
    for turn in range(max_turns):
        live = _still_live(episodes, sampling, max_total_tokens)
        if not live:
            break
        seed = None if sampling.seed is None else sampling.seed + turn * len(episodes)
        outs = engine.generate([e.prompt_ids + e.ids for e in live],
                               replace(sampling, n=1, seed=seed))
        if len(outs) != len(live):
            raise RuntimeError(f"engine returned {len(outs)} rollouts for {len(live)} prompts")
        for e, out in zip(live, outs):
            _take_turn(driver, e, out, turn, max_turns, sampling, max_total_tokens)
    return [_trajectory(driver.name, e, driver.sums_rewards) for e in episodes]


def _still_live(episodes, sampling, max_total_tokens) -> list[_Episode]:
    live = [e for e in episodes if not e.finish]
    if max_total_tokens is not None:
        for e in live:
            if len(e.prompt_ids) + len(e.ids) + sampling.max_new_tokens > max_total_tokens:
                e.finish = "max_tokens"
    return [e for e in live if not e.finish]


def _take_turn(driver, e: _Episode, out, turn, max_turns, sampling, max_total_tokens) -> None:
    """Append one model turn (and the environment's answer) to episode `e`."""
    start = len(e.ids)
    e.ids += out.response_ids
    e.mask += [1] * len(out.response_ids)
    e.logprobs.append(out.logprobs.float().cpu())
    e.spans.append((start, len(e.ids)))
    e.reasons.append(out.finish_reason)
    reward, fb, done = driver.step(e, list(out.response_ids), turn)
    e.rewards.append(reward)
    if done:
        e.finish = "done"
    elif turn == max_turns - 1:
        e.finish = "max_turns"
    elif max_total_tokens is not None and len(e.prompt_ids) + len(e.ids) + len(fb) \
            + sampling.max_new_tokens > max_total_tokens:
        e.finish = "max_tokens"  # no room for another turn: end on model tokens
    else:
        e.ids += fb
        e.mask += [0] * len(fb)
        e.logprobs.append(torch.zeros(len(fb)))


def _call(name: str, method: str, fn, *args):
    try:
        return fn(*args)
    except Exception as e:
        raise RewardError(f"agent {name}.{method} raised {type(e).__name__}: {e}; fix the agent "
                          "class (the traceback above shows where)") from e


def _step(name: str, e: _Episode, out, turn: int):
    """(reward or None, observation text, done) of one step() answer (either interface)."""
    where = f"agent {name}.step (prompt {e.prompt_index}, sample {e.sample_index}, turn {turn})"
    if not isinstance(out, dict):
        raise RewardError(f"{where} returned {type(out).__name__}; return a dict "
                          '{"reward": float|None, "observation": str, "done": bool}')
    reward = out.get("reward", out.get("rewards"))
    if isinstance(reward, torch.Tensor) and reward.numel() == 1:
        reward = reward.item()
    if reward is not None:
        if isinstance(reward, bool) or not isinstance(reward, (int, float)) \
                or not math.isfinite(reward):
            raise RewardError(f"{where} returned reward={reward!r}; it must be a finite float "
                              "or None")
        reward = float(reward)
    done = out.get("done")
    if isinstance(done, torch.Tensor) and done.numel() == 1:
        done = bool(done.item())
    if not isinstance(done, (bool, int)) or isinstance(done, int) and done not in (0, 1):
        raise RewardError(f"{where} returned done={done!r}; it must be True or False")
    observation = out.get("observation", out.get("environment_feedback")) or ""
    if not isinstance(observation, str):
        raise RewardError(f"{where} returned observation of type {type(observation).__name__}; "
                          "it must be the feedback text (str)")
    return reward, observation, bool(done)


def _trajectory(name: str, e: _Episode, sums_rewards: bool = False) -> Trajectory:
    given = [r for r in e.rewards if r is not None]
    if not given:
        hint = (" (max_total_tokens ended it first: raise it or shorten the prompt)"
                if e.finish == "max_tokens" else "")
        raise RewardError(f"agent {name} gave no reward in episode (prompt {e.prompt_index}, "
                          f"sample {e.sample_index}) over {len(e.rewards)} turns{hint}; step() "
                          "must return a float reward at the latest when done (or at max_turns)")
    logprobs = torch.cat(e.logprobs) if e.logprobs else torch.zeros(0)
    return Trajectory(e.prompt_index, e.sample_index, e.prompt_ids, e.ids, e.mask, logprobs,
                      sum(given) if sums_rewards else given[-1], e.rewards, e.spans, e.finish,
                      e.reasons)


__all__ = ["Trajectory", "TurnFormat", "load_agent_class", "run_agent_episodes"]
