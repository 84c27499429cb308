"""The HF-generate rollout engine: any `transformers` causal LM, no vLLM needed.

Give it a model object (the trainer's own model works: then weights never need syncing) and
it samples with `model.generate`. Logprobs follow the protocol's convention: HF's `scores` are
the logits after temperature / top-k / top-p processing, so log_softmax(scores)[token] is the
same quantity vLLM's "processed_logprobs" returns.

Differences from vLLM worth knowing:
- Seeding is per batch (`seed + first prompt index * n` seeds the whole batch), not per sample,
  so results depend on `batch_size`; they are reproducible for a fixed batch_size.
- Prompts are left-padded within a batch; logprobs match an unpadded recompute to float
  rounding (position ids come from the attention mask).
- `ignore_eos` is implemented as min_new_tokens = max_new_tokens, which masks eos in the
  processed distribution (vLLM does not): use it for benchmarks only.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

from hpc_rlhf.rollout.protocol import Rollout, SamplingConfig, check_prompts


class HFEngine:
    """`RolloutEngine` over `model.generate` for a model in this process."""

    def __init__(self, model, *, eos_token_ids: Sequence[int], pad_token_id: int,
                 tokenizer=None, batch_size: int | None = None):
        if not eos_token_ids:
            raise ValueError("eos_token_ids is empty; pass the tokenizer's eos id(s), e.g. "
                             "[tokenizer.eos_token_id]")
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be >= 1 or None (all prompts)")
        self.model = model
        self.eos_token_ids = tuple(int(t) for t in eos_token_ids)
        self.pad_token_id = int(pad_token_id)
        self.tokenizer = tokenizer
        self.batch_size = batch_size

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _generation_config(self, sampling: SamplingConfig):
        from transformers import GenerationConfig
        stops = list(self.eos_token_ids) if not sampling.ignore_eos else []
        stops += list(sampling.stop_token_ids)
        kwargs = dict(max_new_tokens=sampling.max_new_tokens, num_return_sequences=sampling.n,
                      pad_token_id=self.pad_token_id, eos_token_id=stops or None,
                      output_scores=True, return_dict_in_generate=True, use_cache=True)
        if sampling.ignore_eos:
            kwargs["min_new_tokens"] = sampling.max_new_tokens
        if sampling.greedy:
            kwargs.update(do_sample=False)
        else:
            kwargs.update(do_sample=True, temperature=sampling.temperature,
                          top_p=sampling.top_p, top_k=max(sampling.top_k, 0))
        if sampling.stop:
            if self.tokenizer is None:
                raise ValueError(f"stop={sampling.stop} needs HFEngine(tokenizer=...) to match "
                                 "strings")
        return GenerationConfig(**kwargs), set(stops)

    @torch.no_grad()
    def generate(self, prompt_token_ids: Sequence[Sequence[int]],
                 sampling: SamplingConfig) -> list[Rollout]:
        """n samples per prompt, prompt-major; logprobs per the module doc."""
        prompts = check_prompts(prompt_token_ids)
        config, stop_ids = self._generation_config(sampling)
        size = self.batch_size or max(len(prompts), 1)
        was_training = self.model.training
        self.model.eval()
        rollouts: list[Rollout] = []
        try:
            for first in range(0, len(prompts), size):
                batch = prompts[first:first + size]
                rollouts += self._generate_batch(first, batch, sampling, config, stop_ids)
        finally:
            self.model.train(was_training)
        return rollouts

    def _generate_batch(self, first: int, batch: list[list[int]], sampling: SamplingConfig,
                        config, stop_ids: set[int]) -> list[Rollout]:
        width = max(len(p) for p in batch)
        input_ids = torch.full((len(batch), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, p in enumerate(batch):                       # left padding
            input_ids[i, width - len(p):] = torch.tensor(p)
            mask[i, width - len(p):] = 1
        extra = {}
        if sampling.stop:  # HF's own stop_strings cannot index some tokenizers (char-level)
            from transformers import StoppingCriteriaList
            extra["stopping_criteria"] = StoppingCriteriaList(
                [_StopStrings(self.tokenizer, sampling.stop, width)])
        with torch.random.fork_rng(devices=_cuda_devices(self.device)):
            seed = sampling.sample_seed(first, 0)
            if seed is not None:
                torch.manual_seed(seed)
            out = self.model.generate(input_ids=input_ids.to(self.device),
                                      attention_mask=mask.to(self.device),
                                      generation_config=config, **extra)
        responses = out.sequences[:, width:].cpu()          # [b * n, L]
        scores = torch.stack(out.scores, dim=1).float()     # [b * n, L, v] processed logits
        logprobs = torch.log_softmax(scores, dim=-1).gather(
            -1, responses.to(scores.device)[..., None]).squeeze(-1).cpu()  # [b * n, L]
        rollouts = []
        for k in range(responses.shape[0]):
            i, j = divmod(k, sampling.n)
            tokens = responses[k].tolist()
            length, reason = self._response_end(tokens, stop_ids, sampling)
            rollouts.append(Rollout(first + i, j, batch[i], tokens[:length],
                                    logprobs[k, :length].clone(), reason))
        return rollouts

    def _response_end(self, tokens: list[int], stop_ids: set[int],
                      sampling: SamplingConfig) -> tuple[int, str]:
        for t, tok in enumerate(tokens):
            if tok in stop_ids:
                return t + 1, "stop"
            if sampling.stop:  # earliest prefix whose text contains a stop string
                text = self.tokenizer.decode(tokens[:t + 1])
                if any(s in text for s in sampling.stop):
                    return t + 1, "stop"
        return len(tokens), "length"

    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy HF-named tensors into the model (tied names such as lm_head.weight are fine)."""
        targets = dict(self.model.state_dict(keep_vars=True))
        with torch.no_grad():
            for name, t in named_tensors:
                if name not in targets:
                    raise KeyError(f"load_weights got {name!r}, which the model does not have "
                                   f"(e.g. {sorted(targets)[:3]}); send HF checkpoint names")
                targets[name].data.copy_(t)

    def sleep(self) -> None:
        """No-op: the model's memory belongs to whoever owns the model."""

    def wake(self, tags: Sequence[str] | None = None) -> None:
        """No-op (see `sleep`)."""


class _StopStrings:
    """Stopping criterion: a row is done once its response text contains a stop string."""

    def __init__(self, tokenizer, stops: Sequence[str], prompt_width: int):
        self.tokenizer, self.stops, self.start = tokenizer, tuple(stops), prompt_width
        self.window = max(len(s) for s in stops)  # tokens: each decodes to >= 1 character

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        tails = input_ids[:, self.start:][:, -self.window:].tolist()      # [b, <= window]
        done = [any(s in self.tokenizer.decode(row) for s in self.stops) for row in tails]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


def _cuda_devices(device: torch.device) -> list[int]:
    return [device.index or 0] if device.type == "cuda" else []
