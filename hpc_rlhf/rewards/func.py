"""A user's Python reward file: `reward.source=func reward.func_path=path/to/reward_func.py`.

The file defines a batched function `reward_func`, called once per batch with keyword
arguments chosen by its parameter names (never by position). Two conventions:

    def reward_func(queries, prompts, labels, **kwargs):     # OpenRLHF's, unchanged
        # queries: prompt + response as the model saw them (chat template applied, special
        #          tokens kept; queries[i] starts with prompts[i])
        # prompts: the prompt as the model saw it; labels: reference answers
    def reward_func(queries, responses, labels):             # ours: no text surgery needed
        # queries: the prompt as the dataset gave it (no chat template)
        # responses: the generated text, special tokens removed

A function is called the second way when it has a parameter named `responses`, else the first.
It may take any subset of the names (plus `messages`: the dataset's prompt text); a
`**kwargs` parameter gets nothing extra. It returns one reward per sample, in order: a list, a
1-D tensor or numpy array, or (as OpenRLHF documents) a dict
{"rewards": [...], "scores": [...] (optional), "extra_logs": {name: [...] or scalar} (optional)}.
"scores" is what `algorithm.dynamic_filtering` looks at (default: the rewards); each
"extra_logs" entry is logged as its batch mean under reward_extra/<name>.

Only the file the user named is executed: it is loaded by path (importlib), never found on
sys.path, and its directory is not added to sys.path. See examples/reward_func_example.py.
"""
from __future__ import annotations

import hashlib
import importlib.util
import inspect
import sys
from pathlib import Path

import torch

from hpc_rlhf.rewards.base import RewardBatch, RewardError, parse_reward_answer

FUNC_NAME = "reward_func"
OPENRLHF_ARGS = ("queries", "prompts", "labels", "messages")   # queries = prompt + response
OURS_ARGS = ("queries", "responses", "labels", "prompts", "messages")  # queries = the message


def load_user_module(path: str | Path, what: str):
    """Execute the Python file at exactly `path` as a fresh module (errors name the file)."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"{what}={str(path)!r} is not a file; give the path of the "
                                "Python file itself (relative to the working directory or "
                                "absolute)")
    if p.suffix != ".py":
        raise ValueError(f"{what}: {str(path)!r} is not a .py file")
    p = p.resolve()
    name = "hpc_rlhf_user_" + hashlib.sha1(str(p).encode()).hexdigest()[:12]
    spec = importlib.util.spec_from_file_location(name, p)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses / pickling inside the file need the module registered
    try:
        spec.loader.exec_module(module)
    except Exception as e:
        sys.modules.pop(name, None)
        raise RewardError(f"{what}={str(path)!r}: executing it raised {type(e).__name__}: {e}; "
                          f"fix the file (try `python {p}`)") from e
    return module


def load_reward_func(path: str | Path):
    """The `reward_func` callable defined in the file at `path`."""
    module = load_user_module(path, "reward.func_path")
    fn = getattr(module, FUNC_NAME, None)
    if not callable(fn):
        defined = sorted(k for k, v in vars(module).items()
                         if callable(v) and not k.startswith("_"))
        raise RewardError(f"reward.func_path={str(path)!r} defines no function {FUNC_NAME!r} "
                          f"(it defines {defined}); add "
                          f"`def {FUNC_NAME}(queries, prompts, labels): return [...]`")
    return fn


def call_convention(fn, where: str) -> tuple[str, tuple[str, ...]]:
    """("openrlhf" | "ours", the argument names to pass) for a reward function, from its
    parameter names; RewardError when a parameter cannot be filled."""
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):  # a builtin or C callable: assume OpenRLHF's three names
        return "openrlhf", ("queries", "prompts", "labels")
    named = [p for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    names = {p.name for p in named}
    style, known = ("ours", OURS_ARGS) if "responses" in names else ("openrlhf", OPENRLHF_ARGS)
    unknown = [p.name for p in named if p.name not in known and p.default is p.empty]
    positional_only = [p.name for p in params if p.kind is p.POSITIONAL_ONLY]
    if unknown or positional_only or (not names and not any(p.kind is p.VAR_POSITIONAL
                                                            for p in params)):
        bad = unknown or positional_only or ["(no parameters)"]
        raise RewardError(
            f"{where} has parameter(s) {bad} that the loop cannot fill; it passes arguments by "
            f"name: `{FUNC_NAME}(queries, prompts, labels)` (OpenRLHF's: queries = prompt + "
            f"response as the model saw them) or `{FUNC_NAME}(queries, responses, labels)`")
    if not names:  # only *args: OpenRLHF's order is the one documented for positional use
        return "openrlhf", ()
    return style, tuple(n for n in known if n in names)


def call_reward_func(fn, style: str, names: tuple[str, ...], batch: RewardBatch):
    """Call `fn` with `batch` in the convention `call_convention` chose."""
    if style == "ours":
        values = {"queries": batch.messages, "responses": batch.responses,
                  "labels": batch.labels, "prompts": batch.prompts, "messages": batch.messages}
    else:
        values = {"queries": batch.queries, "prompts": batch.prompts, "labels": batch.labels,
                  "messages": batch.messages}
    if not names:
        return fn(list(batch.queries), list(batch.prompts), list(batch.labels))
    return fn(**{n: list(values[n]) for n in names})


class FuncReward:
    """`RewardSource` over a user `reward_func` (conventions in the module doc)."""

    def __init__(self, path: str | Path):
        self.path = str(path)
        self.fn = load_reward_func(path)
        self.style, self.arg_names = call_convention(self.fn, f"reward_func in {self.path}")
        self.last_scores: torch.Tensor | None = None   # [B] from the dict form's "scores"
        self.last_logs: dict[str, float] = {}          # batch means of "extra_logs"

    def score(self, batch: RewardBatch) -> torch.Tensor:
        n = len(batch)
        where = f"reward_func in {self.path}"
        try:
            out = call_reward_func(self.fn, self.style, self.arg_names, batch)
        except Exception as e:
            raise RewardError(f"{where} raised {type(e).__name__}: {e} (batch of {n} samples); "
                              "fix the function (the traceback above shows where)") from e
        fix = (f"Fix {self.path}: reward_func must return one finite float per sample (a list, "
               'a 1-D tensor, or {"rewards": [...]}).')
        self.last_scores, self.last_logs = None, {}
        rewards, self.last_scores, self.last_logs = parse_reward_answer(out, n, where, fix)
        return rewards

    def __repr__(self) -> str:
        return f"FuncReward({self.path!r})"
