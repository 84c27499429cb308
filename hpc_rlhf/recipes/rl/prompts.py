"""The RL prompt stream: prompts (built-in task or dataset) -> chat-templated token ids, served
step by step in a reproducible order, each engine getting its own share.

The order of step s is a permutation of the whole prompt set seeded by (data.seed, epoch), so a
resumed run that restores `cursor` sees exactly the prompts the uninterrupted run would.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from hpc_rlhf.data.chat import ChatFormat
from hpc_rlhf.data.tasks import make_task


@dataclass(frozen=True)
class Prompt:
    ids: list[int]       # chat-templated prompt token ids
    text: str            # the user message (what a reward function sees as the query)
    label: str           # reference answer ('' if the data has none)


def load_prompts(source: str, tokenizer, *, apply_chat_template: bool, max_prompt_len: int,
                 num_task_prompts: int, seed: int, input_key: str = "prompt",
                 label_key: str = "label", skip_bad_rows: bool = False,
                 chat_template: str = "", input_template: str = "",
                 max_samples: int = 0, probs=()) -> list[Prompt]:
    """Every prompt of `source` ('task:<name>' or a data file), too-long ones dropped."""
    fmt = ChatFormat(tokenizer, apply_chat_template=apply_chat_template,
                     chat_template=chat_template or None, input_template=input_template or None)
    if source.startswith("task:"):
        rows = [(s.prompt, s.label) for s in make_task(source, num_task_prompts, seed)]
        prompts = [Prompt(fmt.prompt_ids(q), q, lab) for q, lab in rows]
    else:
        from hpc_rlhf.data.samples import load_samples, prompt_sample
        samples, _ = load_samples(
            source, lambda row: prompt_sample(row, fmt, input_key, label_key),
            max_len=max_prompt_len, skip_bad_rows=skip_bad_rows, limit=max_samples or None,
            probs=probs, seed=seed)
        prompts = [Prompt(s.prompt_ids, s.prompt if isinstance(s.prompt, str)
                          else s.prompt[-1]["content"], "" if s.label is None else str(s.label))
                   for s in samples]
    kept = [p for p in prompts if len(p.ids) <= max_prompt_len]
    if not kept:
        raise ValueError(f"data.prompts={source!r}: every prompt is longer than "
                         f"data.max_prompt_len={max_prompt_len} tokens; raise it")
    return kept


def config_prompts(data_cfg, tokenizer, *, source: str | None = None, num: int | None = None,
                   seed: int | None = None) -> list[Prompt]:
    """`load_prompts` with every option taken from the config's `data` section."""
    d = data_cfg
    return load_prompts(source or d.prompts, tokenizer, apply_chat_template=d.apply_chat_template,
                        max_prompt_len=d.max_prompt_len,
                        num_task_prompts=num or d.num_task_prompts,
                        seed=d.seed if seed is None else seed, input_key=d.input_key,
                        label_key=d.label_key, skip_bad_rows=d.skip_bad_rows,
                        chat_template=d.chat_template, input_template=d.input_template,
                        max_samples=d.max_samples if source is None else 0,
                        probs=d.prompts_probs if source is None else ())


def prompt_stream(cfg, tokenizer) -> "PromptStream":
    """The RL prompt stream of a job config (same order on every rank)."""
    return PromptStream(config_prompts(cfg.data, tokenizer), cfg.rollout.prompts_per_step,
                        cfg.data.seed)


class PromptStream:
    """Hands out `per_step` prompts per step from a shuffled, epoch-cycled prompt list."""

    def __init__(self, prompts: list[Prompt], per_step: int, seed: int):
        if len(prompts) < per_step:
            raise ValueError(f"only {len(prompts)} prompts for rollout.prompts_per_step="
                             f"{per_step}; give more data or lower prompts_per_step")
        self.prompts, self.per_step, self.seed = prompts, per_step, seed
        self.cursor = 0  # prompts handed out so far (the resumable state)

    def _order(self, epoch: int) -> list[int]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(len(self.prompts), generator=g).tolist()

    def next_step(self) -> list[Prompt]:
        """The next step's prompts (identical on every rank)."""
        n = len(self.prompts)
        usable = n - n % self.per_step  # steps never straddle two epochs
        epoch, offset = divmod(self.cursor, usable)
        order = self._order(epoch)
        self.cursor += self.per_step
        return [self.prompts[i] for i in order[offset:offset + self.per_step]]

    def state_dict(self) -> dict:
        return {"cursor": self.cursor}

    def load_state_dict(self, state: dict) -> None:
        self.cursor = int(state["cursor"])


def shard(items: list, index: int, count: int) -> list:
    """Contiguous share `index` of `count` (len(items) must divide evenly)."""
    if len(items) % count:
        raise ValueError(f"{len(items)} items cannot be split evenly over {count} ranks")
    size = len(items) // count
    return items[index * size:(index + 1) * size]
