"""Tied input/output embeddings in a weight sync.

A trainer's parameters list a tied embedding once (model.embed_tokens.weight), but vLLM's
in-place reload rebuilds its lm_head layer from the tensors it receives under the lm_head's
own name: without it the engine keeps the old output embedding and its logprobs drift from
the trainer's after every update (measured: max gap 2.5 on a tiny model, where the untied
case stays below 1e-6). So the output name is sent too, sharing the input tensor.
"""
from __future__ import annotations

from typing import Iterable, Iterator

import torch


def tied_output_name(model: torch.nn.Module) -> tuple[str, str] | None:
    """(input embedding name, output embedding name) when they are tied, else None.

    `model` may be a DeepSpeed engine, a peft model or our value-model wrapper; names are
    the plain HF names a rollout engine loads.
    """
    inner = getattr(model, "module", model)
    inner = getattr(inner, "hf", inner)
    if hasattr(inner, "get_base_model"):
        inner = inner.get_base_model()
    config = getattr(inner, "config", None)
    if not getattr(config, "tie_word_embeddings", False):
        return None
    try:
        w_in, w_out = inner.get_input_embeddings().weight, inner.get_output_embeddings().weight
    except (AttributeError, NotImplementedError):
        return None
    in_name = next(n for n, t in inner.named_parameters() if t is w_in)
    out_names = [n for n, t in inner.named_parameters(remove_duplicate=False)
                 if t is w_out and n != in_name]
    return (in_name, out_names[0]) if out_names else None


def with_tied_outputs(named: Iterable[tuple[str, torch.Tensor]],
                      model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """`named`, plus the output embedding (same tensor) right after a tied input embedding."""
    pair = tied_output_name(model)
    for name, t in named:
        yield name, t
        if pair is not None and name == pair[0]:
            yield pair[1], t
