"""Built-in verifiable tasks: prompts with reference labels and an exact, cheap reward.

`data.prompts: task:<name>` selects one. Each task is deterministic in its seed, so a run and
its resumed twin see the same prompts.

- arithmetic: "What is 3+4? Answer with the number only." -> "7"; reward 1 when the response's
  first number equals the sum (single-digit operands: a small instruct model starts at 10-40%).
- repeat: "Repeat the letter c" -> "cccccccc"; reward is the fraction of response characters
  equal to the letter. Dense, so a random tiny model learns it in a few dozen steps.
- copy: "Copy: kqz" -> "kqz"; reward 1 for an exact copy, else the fraction of matching
  positions (for tiny models after a short SFT warm-up).
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Callable

_NUMBER = re.compile(r"-?\d+")


@dataclass(frozen=True)
class TaskSample:
    prompt: str      # the user message (the chat template is applied later)
    label: str       # the reference answer
    answer: str      # a correct response, for SFT warm-ups and tests


def _arithmetic(rng: random.Random) -> TaskSample:
    a, b = rng.randint(0, 9), rng.randint(0, 9)
    return TaskSample(f"What is {a}+{b}? Answer with the number only.", str(a + b), str(a + b))


def _repeat(rng: random.Random) -> TaskSample:
    letter = rng.choice("abcde")
    return TaskSample(f"Repeat the letter {letter}", letter, letter * 8)


def _copy(rng: random.Random) -> TaskSample:
    word = "".join(rng.choice("abcdefghij") for _ in range(rng.randint(2, 4)))
    return TaskSample(f"Copy: {word}", word, word)


def arithmetic_reward(response: str, label: str) -> float:
    m = _NUMBER.search(response)
    return 1.0 if m is not None and m.group() == label else 0.0


def repeat_reward(response: str, label: str) -> float:
    text = response.strip()
    return sum(c == label for c in text) / max(len(text), 8)


def copy_reward(response: str, label: str) -> float:
    text = response.strip()
    if text == label:
        return 1.0
    hits = sum(a == b for a, b in zip(text, label))
    return 0.5 * hits / max(len(text), len(label), 1)


TASKS: dict[str, tuple[Callable[[random.Random], TaskSample], Callable[[str, str], float]]] = {
    "arithmetic": (_arithmetic, arithmetic_reward),
    "repeat": (_repeat, repeat_reward),
    "copy": (_copy, copy_reward),
}


def task_name(source: str) -> str:
    """'task:arithmetic' -> 'arithmetic' (with a clear error for unknown tasks)."""
    name = source.split(":", 1)[1] if source.startswith("task:") else source
    if name not in TASKS:
        raise ValueError(f"data.prompts={source!r}: unknown task {name!r}; built-in tasks are "
                         f"{['task:' + t for t in TASKS]}")
    return name


def make_task(source: str, num: int, seed: int = 0) -> list[TaskSample]:
    make, _ = TASKS[task_name(source)]
    rng = random.Random(f"{source}:{seed}")
    return [make(rng) for _ in range(num)]


def task_reward(source: str) -> Callable[[str, str], float]:
    return TASKS[task_name(source)][1]
