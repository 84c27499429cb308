"""Rollout collection: plain generation or multi-turn agent episodes, as one record type, and
DAPO dynamic filtering (refill the step with groups whose rewards differ)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from hpc_rlhf.config import JobConfig


@dataclass
class Episode:
    prompt_index: int             # index into the prompts given to `collect`
    prompt_ids: list[int]
    response_ids: list[int]       # model tokens, and environment tokens for agents
    logprobs: torch.Tensor        # [len(response_ids)] engine logprobs (0 at env tokens)
    action_mask: list[int] | None  # 1 = model token; None = all model tokens
    finish_reason: str
    reward: float | None = None   # set by agent environments; None = score afterwards
    version: int = 0              # policy version (weight syncs) that generated it


def load_agent(cfg: JobConfig):
    if cfg.reward.source != "agent":
        return None
    from hpc_rlhf.rewards.agent import load_agent_class
    return load_agent_class(cfg.reward.agent_path)


def collect(cfg: JobConfig, engine, tok, prompts, sampling, agent_cls=None,
            version: int = 0) -> list[Episode]:
    """n episodes per prompt, prompt-major."""
    if agent_cls is None:
        return [Episode(r.prompt_index, r.prompt_ids, r.response_ids, r.logprobs, None,
                        r.finish_reason, None, version)
                for r in engine.generate([p.ids for p in prompts], sampling)]
    from hpc_rlhf.rewards.agent import run_agent_episodes
    trajs = run_agent_episodes(
        engine, tok, agent_cls, [p.text for p in prompts], [p.label for p in prompts], sampling,
        cfg.reward.max_turns, apply_chat_template=cfg.data.apply_chat_template,
        chat_template=cfg.data.chat_template or None,
        max_total_tokens=getattr(engine, "max_model_len", None),
        input_template=cfg.data.input_template or None)
    return [Episode(t.prompt_index, t.prompt_ids, t.response_ids, t.logprobs, t.action_mask,
                    t.finish_reason, float(t.reward), version) for t in trajs]


def varied_groups(rewards: torch.Tensor, n: int, mean_range=()) -> list[bool]:
    """Per group of n: True when its rewards are not all equal (it carries a learning signal)
    and, with mean_range=(low, high), their mean lies strictly inside it."""
    from hpc_rlhf.algos.filtering import dynamic_filter_groups
    return dynamic_filter_groups(rewards, n, tuple(mean_range) or None).view(-1, n)[:, 0].tolist()
