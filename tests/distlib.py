"""Helpers shared by the multi-process test modules (tests/distributed, tests/e2e).

They used to live in one test module and be imported by its neighbours, which made a module's
helpers depend on another module's collection (and on tests/distributed being on sys.path).
Spawning goes through testlib.spawn: ports come from the TCPStore it hosts, never free_port().
"""
from __future__ import annotations

import json
import os
import random
from contextlib import contextmanager
from pathlib import Path

import torch

from testlib import REPO, spawn

ROOT = REPO   # the repository root: configs/ lives here


@contextmanager
def private_model_cache(path: Path):
    """HPC_RLHF_CACHE=path for the block (spawned ranks inherit it), restored after: a module
    that builds its models privately cannot race other tests rebuilding the shared cache."""
    old = os.environ.get("HPC_RLHF_CACHE")
    os.environ["HPC_RLHF_CACHE"] = str(path)
    try:
        yield Path(path)
    finally:
        if old is None:
            os.environ.pop("HPC_RLHF_CACHE", None)
        else:
            os.environ["HPC_RLHF_CACHE"] = old


def read_metrics(run_dir: Path) -> list[dict]:
    """The rows of a run's metrics.jsonl, in order."""
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def write_scored_repeat(path: Path, n: int, seed: int = 0) -> None:
    """CSFT data: `repeat` prompts answered right ("cccccccc", score 8) or wrong ("zzzzzzzz",
    score 0), half each. (With graded scores, k right letters then z's, the tiny model needs
    > 120 steps before it uses the tag; two levels show the mechanism in 30.)"""
    from hpc_rlhf.data.tasks import make_task
    rng = random.Random(seed)
    with Path(path).open("w") as f:
        for s in make_task("task:repeat", n, seed):
            k = rng.choice((0, 8))
            response = s.label * k + "z" * (8 - k)
            f.write(json.dumps({"prompt": s.prompt, "response": response, "score": k}) + "\n")


# ---- DeepSpeed strategy workers (as in test_deepspeed_strategy.py) --------------------------
def init_rank(rank: int, world: int, port: int) -> None:
    """A spawned worker's torchrun-like environment; `port` is the parent's TCPStore (spawn),
    which DeepSpeed's env:// init joins as a client."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)


def run_ranks(fn, world: int, args: tuple, timeout_s: float = 120.0) -> None:
    """Spawn `world` processes running fn(rank, world, port, *args); fail (not hang) past
    scaled(timeout_s)."""
    spawn(fn, world, args, timeout_s)


# ---- the tiny packed Llama of the ring-attention tests ---------------------------------------
CU_SEQLENS = [0, 13, 42, 48, 69]  # 4 packed samples, 69 tokens (pads to 70 / 72 on 2 ranks)
RING_STEPS, RING_LR = 5, 3e-3


def tiny_llama(dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=64, vocab_size=128, max_position_embeddings=256,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config).to(dtype)


def packed_batch():
    torch.manual_seed(1)
    input_ids = torch.randint(0, 128, (CU_SEQLENS[-1],))
    labels = torch.full_like(input_ids, -100)  # next token inside the same sample
    for s, e in zip(CU_SEQLENS[:-1], CU_SEQLENS[1:]):
        labels[s:e - 1] = input_ids[s + 1:e]
    return input_ids, labels


def token_logprobs(logits, labels):
    """[..., L, V], [..., L] -> log p(label) with 0 where label == -100."""
    valid = labels != -100
    logp = logits.log_softmax(-1).gather(-1, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    return logp * valid


def reference_loss(model, input_ids, labels):
    """Plain model, one sample at a time (no packing, no ring): mean token NLL."""
    logps = [
        token_logprobs(model(input_ids[s:e][None], use_cache=False).logits[0], labels[s:e])
        for s, e in zip(CU_SEQLENS[:-1], CU_SEQLENS[1:])
    ]
    return -torch.cat(logps).sum() / (labels != -100).sum()
