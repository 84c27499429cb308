"""The `RewardSource` seam: a `RewardBatch` of texts in, one float per sample out.

Every source (built-in task, user reward_func.py, remote HTTP server, reward model) returns a
float32 tensor of shape [B] with finite values, or raises `RewardError` naming the source, what
went wrong and the fix. A step is never silently scored 0. A source may also keep, for the
last batch, `last_scores` ([B], OpenRLHF's "scores": what dynamic filtering looks at) and
`last_logs` (name -> batch mean, logged as reward_extra/<name>).

Multi-turn agents (reward.source=agent) are not a `RewardSource`: their reward comes from the
environment during the episode, so the RL loop calls `rewards.agent.run_agent_episodes` instead
of `engine.generate` + `score` (each trajectory carries its reward).
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch


class RewardError(RuntimeError):
    """A reward source failed or returned something unusable (never scored as 0)."""


@dataclass(frozen=True)
class RewardBatch:
    """The texts of B scored samples, each list in sample order.

    messages : the prompt as the dataset gave it (the last user message; no chat template)
    responses: the generated text, special tokens removed
    prompts  : the prompt as the model saw it (chat template applied, special tokens kept);
               OpenRLHF's `prompts`
    queries  : prompt + response as the model saw them (special tokens kept, no padding);
               always starts with `prompts[i]`; OpenRLHF's `queries`
    labels   : the dataset's reference answers ('' where a row has none)
    """
    messages: list[str]
    responses: list[str]
    prompts: list[str]
    queries: list[str]
    labels: list[str]

    def __post_init__(self):
        sizes = {k: len(getattr(self, k)) for k in
                 ("messages", "responses", "prompts", "queries", "labels")}
        if len(set(sizes.values())) != 1:
            raise ValueError(f"RewardBatch lists differ in length {sizes}; pass one of each "
                             "per sample")

    def __len__(self) -> int:
        return len(self.responses)

    @classmethod
    def from_texts(cls, messages, responses, labels, prompts=None) -> "RewardBatch":
        """A batch without token ids: prompts default to the messages, queries to
        prompt + response (for tests, servers and hand-made batches)."""
        prompts = list(messages) if prompts is None else list(prompts)
        return cls(list(messages), list(responses), prompts,
                   [p + r for p, r in zip(prompts, responses)], [str(x) for x in labels])

    def rows(self, start: int, end: int) -> "RewardBatch":
        return RewardBatch(*(getattr(self, k)[start:end] for k in
                             ("messages", "responses", "prompts", "queries", "labels")))


def reward_batch(tokenizer, prompt_ids, response_ids, messages, labels) -> RewardBatch:
    """The `RewardBatch` of token sequences: per sample the prompt's ids (as fed to the model),
    the response's ids, the raw prompt message and the label."""
    prompts = tokenizer.batch_decode(prompt_ids, skip_special_tokens=False)
    responses = tokenizer.batch_decode(response_ids, skip_special_tokens=True)
    fulls = tokenizer.batch_decode([list(p) + list(r) for p, r in zip(prompt_ids, response_ids)],
                                   skip_special_tokens=False)
    queries = []
    for p, full, r_ids in zip(prompts, fulls, response_ids):
        # Decoding the joined ids is what the model saw; when a tokenizer's decode does not keep
        # the prompt as a prefix (SentencePiece space handling), join the two decodes instead.
        queries.append(full if full.startswith(p) else
                       p + tokenizer.decode(r_ids, skip_special_tokens=False))
    return RewardBatch(list(messages), responses, prompts, queries,
                       ["" if x is None else str(x) for x in labels])


@runtime_checkable
class RewardSource(Protocol):
    def score(self, batch: RewardBatch) -> torch.Tensor:
        """[B] float32 finite rewards, B = len(batch)."""
        ...


def _short(value, limit: int = 200) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + f"... ({len(text)} chars)"


def as_number(v):
    """A real number from a Python/numpy/0-dim-tensor scalar, else None (bools are refused)."""
    if isinstance(v, torch.Tensor):
        if v.numel() != 1 or v.is_complex():
            return None
        v = v.item()
    elif hasattr(v, "item") and getattr(v, "shape", None) == ():  # numpy scalars and 0-d arrays
        v = v.item()
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
        return None
    return float(v)


def as_reward_tensor(values, expected: int, *, source: str, fix: str) -> torch.Tensor:
    """Validate `values` (list/tuple/tensor/ndarray of numbers) into a [expected] float32 tensor.

    source: who produced them (e.g. "reward_func in /x/reward.py"); fix: how to repair it.
    """
    if isinstance(values, torch.Tensor):
        if values.dim() == 2 and values.shape[-1] == 1:  # [B, 1] is a common head output
            values = values[:, 0]
        if values.dim() != 1:
            raise RewardError(f"{source} returned a tensor of shape {tuple(values.shape)}; it "
                              f"must have shape [{expected}] (one reward per sample). {fix}")
        if values.is_floating_point() or values.dtype in (torch.int32, torch.int64, torch.bool):
            items = values.detach().cpu().double().tolist()
        else:
            raise RewardError(f"{source} returned a tensor of dtype {values.dtype}; rewards "
                              f"must be real numbers. {fix}")
    elif hasattr(values, "tolist") and hasattr(values, "shape"):  # numpy arrays
        items = values.tolist()
        if len(getattr(values, "shape", ())) != 1:
            raise RewardError(f"{source} returned an array of shape {values.shape}; it must have "
                              f"shape [{expected}]. {fix}")
    elif isinstance(values, (list, tuple)):
        items = list(values)
    else:
        raise RewardError(f"{source} returned {type(values).__name__} {_short(values)}; it must "
                          f"return a list of {expected} floats (or a 1-D tensor). {fix}")
    if len(items) != expected:
        raise RewardError(f"{source} returned {len(items)} rewards for a batch of {expected} "
                          f"samples; return exactly one reward per sample, in order. {fix}")
    out = []
    for i, item in enumerate(items):
        v = as_number(item)
        if v is None:
            raise RewardError(f"{source} returned a non-number at index {i}: {_short(item)} "
                              f"({type(item).__name__}); every reward must be a float. {fix}")
        if not math.isfinite(v):
            raise RewardError(f"{source} returned {v} at index {i}; rewards must be finite "
                              f"(no NaN or inf). {fix}")
        out.append(v)
    return torch.tensor(out, dtype=torch.float32)  # [B]


def parse_reward_answer(out, n: int, where: str, fix: str):
    """(rewards [n], scores [n] or None, extra_logs name -> mean) of a reward function's or
    server's answer: a list/tensor/array of rewards, or a dict with "rewards" and optional
    "scores" and "extra_logs"."""
    scores, logs = None, {}
    if isinstance(out, dict):
        if "rewards" not in out:
            raise RewardError(f"{where} returned a dict with keys {sorted(out)} but no "
                              f"'rewards'. {fix}")
        if out.get("scores") is not None:
            scores = as_reward_tensor(out["scores"], n, source=f"{where} ('scores')", fix=fix)
        logs = extra_log_means(out.get("extra_logs"), n, where, fix)
        out = out["rewards"]
    return as_reward_tensor(out, n, source=where, fix=fix), scores, logs


def extra_log_means(logs, n: int, where: str, fix: str) -> dict[str, float]:
    """name -> batch mean of `extra_logs` values: n numbers each, or one scalar of any numeric
    type (Python, numpy, 0-dim tensor)."""
    if logs is None:
        return {}
    if not isinstance(logs, dict):
        raise RewardError(f"{where} returned extra_logs of type {type(logs).__name__}; it must "
                          f"be a dict name -> list of {n} numbers. {fix}")
    means = {}
    for key, value in logs.items():
        scalar = as_number(value)
        if scalar is not None:
            value = [scalar] * n
        means[str(key)] = as_reward_tensor(value, n, source=f"{where} (extra_logs[{key!r}])",
                                           fix=fix).mean().item()
    return means


def build_reward_source(cfg) -> RewardSource:
    """The reward source `cfg.reward.source` selects (cfg: a `JobConfig`).

    task   -> TaskReward(cfg.data.prompts)          built-in verifiable tasks
    func   -> FuncReward(cfg.reward.func_path)      a user reward_func.py
    remote -> RemoteReward(cfg.reward.remote_url)   HTTP reward server(s), comma-separated
    model  -> ModelReward(cfg.model.reward_model_path)
    agent  -> not a scorer: use rewards.agent.run_agent_episodes (raises here)
    """
    rw = cfg.reward
    if rw.source == "task":
        from hpc_rlhf.rewards.task import TaskReward
        return TaskReward(cfg.data.prompts)
    if rw.source == "func":
        from hpc_rlhf.rewards.func import FuncReward
        return FuncReward(rw.func_path)
    if rw.source == "remote":
        from hpc_rlhf.rewards.remote import RemoteReward
        return RemoteReward(rw.remote_url, timeout_s=rw.remote_timeout_s,
                            retries=rw.remote_retries, protocol=rw.remote_protocol)
    if rw.source == "model":
        from hpc_rlhf.rewards.model import ModelReward
        return ModelReward.from_config(cfg)
    if rw.source == "agent":
        raise ValueError("reward.source='agent' has no batch scorer: rewards come from the "
                         "agent's step() during the episode; load the class with "
                         "rewards.agent.load_agent_class(cfg.reward.agent_path) and roll out "
                         "with rewards.agent.run_agent_episodes")
    raise ValueError(f"reward.source={rw.source!r} is not one of task, func, remote, model, agent")
