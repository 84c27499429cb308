"""What every rollout engine takes and returns, and the `RolloutEngine` seam itself.

Prompts are token ids (the caller applies the chat template). An engine returns `n` samples per
prompt, prompt-major: results[i * n + j] is sample j of prompt i.

Logprob convention (the one the trainer must recompute to compare): the logprob of each
sampled token under the distribution it was *sampled from*, i.e. log_softmax(logits /
temperature) restricted to the top-k / top-p set and renormalised. With top_k=-1 and
top_p=1 (the RL default) that is exactly `log_softmax(logits / temperature)[token]`, what
`hpc_rlhf.engine.logprobs.logprobs_from_logits(logits, labels, temperature)` computes. With
temperature 0 (greedy) it is log_softmax(logits) (temperature 1).
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol, runtime_checkable

import torch

FinishReason = Literal["stop", "length"]


@dataclass(frozen=True)
class SamplingConfig:
    """How to sample: one config for a whole `generate` call."""

    n: int = 1                      # samples per prompt
    max_new_tokens: int = 64        # response budget per sample (tokens)
    temperature: float = 1.0        # 0 = greedy
    top_p: float = 1.0              # nucleus mass in (0, 1]; 1 = off
    top_k: int = -1                 # -1 = off
    stop: tuple[str, ...] = ()      # stop strings (the matched text's tokens stay in the response)
    stop_token_ids: tuple[int, ...] = ()  # extra stop tokens besides the model's eos
    ignore_eos: bool = False        # keep sampling past eos (benchmarks)
    # Sample j of prompt i uses seed + i * n + j, so results do not depend on how prompts are
    # batched, and two prompts never share a noise stream. None = engine's own RNG.
    seed: int | None = None

    def __post_init__(self):
        errors = []
        if self.n < 1:
            errors.append(f"n={self.n} must be >= 1 (samples per prompt)")
        if self.max_new_tokens < 1:
            errors.append(f"max_new_tokens={self.max_new_tokens} must be >= 1")
        if self.temperature < 0:
            errors.append(f"temperature={self.temperature} must be >= 0 (0 = greedy)")
        if not 0 < self.top_p <= 1:
            errors.append(f"top_p={self.top_p} must be in (0, 1] (1 = off)")
        if self.top_k == 0 or self.top_k < -1:
            errors.append(f"top_k={self.top_k} must be -1 (off) or >= 1")
        if isinstance(self.stop, str) or not all(isinstance(s, str) and s for s in self.stop):
            errors.append(f"stop={self.stop!r} must be a tuple of non-empty strings")
        if errors:
            raise ValueError("invalid SamplingConfig: " + "; ".join(errors))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def sample_seed(self, prompt_index: int, sample_index: int) -> int | None:
        """The seed of sample `sample_index` of prompt `prompt_index` (None if unseeded)."""
        if self.seed is None:
            return None
        return self.seed + prompt_index * self.n + sample_index


@dataclass
class Rollout:
    """One sampled response. `logprobs[t]` is the logprob of `response_ids[t]` (float32)."""

    prompt_index: int                     # index into the prompts given to `generate`
    sample_index: int                     # 0 .. n-1 within its prompt
    prompt_ids: list[int]
    response_ids: list[int]
    logprobs: torch.Tensor                # [len(response_ids)] float32
    finish_reason: FinishReason           # "stop": eos / stop token / stop string; "length": budget
    info: dict = field(default_factory=dict)  # engine extras (e.g. vLLM stop_reason)

    def __post_init__(self):
        if self.logprobs.shape != (len(self.response_ids),):
            raise ValueError(f"logprobs shape {tuple(self.logprobs.shape)} must be "
                             f"[{len(self.response_ids)}] (one per response token)")


@runtime_checkable
class RolloutEngine(Protocol):
    """A generation backend. Implementations: `VLLMEngine` (default), `HFEngine` (fallback)."""

    def generate(self, prompt_token_ids: Sequence[Sequence[int]],
                 sampling: SamplingConfig) -> list[Rollout]:
        """n samples per prompt, prompt-major (results[i * n + j])."""
        ...

    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Replace the weights by HF-named full tensors (consumed lazily, may be a generator)."""
        ...

    def sleep(self) -> None:
        """Free accelerator memory (weights offloaded, KV cache dropped); no-op where unsupported."""
        ...

    def wake(self, tags: Sequence[str] | None = None) -> None:
        """Undo `sleep`: tags ("weights",) then ("kv_cache",) lets a weight sync run in between."""
        ...


def check_prompts(prompt_token_ids: Sequence[Sequence[int]]) -> list[list[int]]:
    """Validate prompts (non-empty lists of ints) and return them as lists."""
    out = []
    for i, ids in enumerate(prompt_token_ids):
        ids = [int(t) for t in ids]
        if not ids:
            raise ValueError(f"prompt_token_ids[{i}] is empty; every prompt needs >= 1 token "
                             "(apply the chat template first)")
        out.append(ids)
    return out


def logprob_gap(rollouts: Sequence[Rollout], recomputed: Sequence[torch.Tensor]) -> dict:
    """Engine vs trainer logprobs of the same tokens: max and mean absolute gap (a metric).

    recomputed[k]: [len(rollouts[k].response_ids)] trainer logprobs of rollout k's response.
    """
    if len(rollouts) != len(recomputed):
        raise ValueError(f"{len(rollouts)} rollouts but {len(recomputed)} recomputed logprob rows")
    diffs = []
    for k, (r, lp) in enumerate(zip(rollouts, recomputed)):
        lp = lp.detach().float().cpu().reshape(-1)
        if lp.shape != r.logprobs.shape:
            raise ValueError(f"recomputed[{k}] has {lp.numel()} logprobs, rollout has "
                             f"{r.logprobs.numel()} response tokens")
        diffs.append((lp - r.logprobs.float().cpu()).abs())
    flat = torch.cat(diffs) if diffs else torch.zeros(0)
    if flat.numel() == 0:
        return {"logprob_gap_max": 0.0, "logprob_gap_mean": 0.0}
    return {"logprob_gap_max": flat.max().item(), "logprob_gap_mean": flat.mean().item()}
