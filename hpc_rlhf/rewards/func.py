"""A user's Python reward file: `reward.source=func reward.func_path=path/to/reward_func.py`.

The file defines a batched function

    def reward_func(queries: list[str], responses: list[str], labels: list[str]):
        return [float, ...]            # one reward per sample, in order
        # or a 1-D tensor / numpy array, or (OpenRLHF's convention) a dict:
        # {"rewards": [...], "scores": [...] (optional), "extra_logs": {name: [...]} (optional)}

queries are the prompts as the model saw them (chat template applied), responses the generated
texts, labels the dataset's reference answers ('' where a dataset has none). "scores" (e.g. a
0/1 correctness used for dynamic filtering) and the batch means of "extra_logs" are kept in
`FuncReward.last_scores` / `last_logs` for the loop to log.

Only the file the user named is executed: it is loaded by path (importlib), never found on
sys.path, and its directory is not added to sys.path. See examples/reward_func_example.py.
"""
from __future__ import annotations

import hashlib
import importlib.util
import sys
from pathlib import Path

import torch

from hpc_rlhf.rewards.base import RewardError, as_reward_tensor, check_batch

FUNC_NAME = "reward_func"


def load_user_module(path: str | Path, what: str):
    """Execute the Python file at exactly `path` as a fresh module (errors name the file)."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"{what}: {str(path)!r} is not a file; give the path of the "
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
        raise RewardError(f"{what}: executing {p} raised {type(e).__name__}: {e}; fix the file "
                          f"(try `python {p}`)") from e
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
                          f"`def {FUNC_NAME}(queries, responses, labels): return [...]`")
    return fn


class FuncReward:
    """`RewardSource` over a user `reward_func(queries, responses, labels)`."""

    def __init__(self, path: str | Path):
        self.path = str(path)
        self.fn = load_reward_func(path)
        self.last_scores: torch.Tensor | None = None   # [B] from the dict form's "scores"
        self.last_logs: dict[str, float] = {}          # batch means of "extra_logs"

    def score(self, queries: list[str], responses: list[str], labels: list[str]) -> torch.Tensor:
        n = check_batch(queries, responses, labels)
        where = f"reward_func in {self.path}"
        try:
            out = self.fn(list(queries), list(responses), list(labels))
        except Exception as e:
            raise RewardError(f"{where} raised {type(e).__name__}: {e} (batch of {n} samples); "
                              "fix the function (the traceback above shows where)") from e
        fix = (f"Fix {self.path}: reward_func must return one finite float per sample (a list, "
               'a 1-D tensor, or {"rewards": [...]}).')
        self.last_scores, self.last_logs = None, {}
        if isinstance(out, dict):
            if "rewards" not in out:
                raise RewardError(f"{where} returned a dict with keys {sorted(out)} but no "
                                  f"'rewards'. {fix}")
            if out.get("scores") is not None:
                self.last_scores = as_reward_tensor(out["scores"], n, source=f"{where} ('scores')",
                                                    fix=fix)
            self.last_logs = _extra_logs(out.get("extra_logs"), n, where, fix)
            out = out["rewards"]
        return as_reward_tensor(out, n, source=where, fix=fix)

    def __repr__(self) -> str:
        return f"FuncReward({self.path!r})"


def _extra_logs(logs, n: int, where: str, fix: str) -> dict[str, float]:
    if logs is None:
        return {}
    if not isinstance(logs, dict):
        raise RewardError(f"{where} returned extra_logs of type {type(logs).__name__}; it must "
                          f"be a dict name -> list of {n} numbers. {fix}")
    means = {}
    for key, value in logs.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = [value] * n
        means[str(key)] = as_reward_tensor(value, n, source=f"{where} (extra_logs[{key!r}])",
                                           fix=fix).mean().item()
    return means
