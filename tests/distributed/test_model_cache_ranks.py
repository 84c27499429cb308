"""Every cached model, built by rank 1 of a 2-rank world into an empty cache, loads on both
ranks. transformers 5.x save_pretrained writes no config and no weights on a rank that is not 0
of an initialised world; that once poisoned a fresh machine's cache for every later job."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from testlib import spawn

pytestmark = pytest.mark.distributed

NAMES = ("tiny:llama", "tiny:qwen2", "tiny:mixtral", "tiny:qwen3_moe", "tiny:qwen2_moe",
         "embedded:smollm2-135m")


def _worker(rank: int, world: int, port: int, cache: str, out: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), HPC_RLHF_CACHE=cache)
    import torch
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hpc_rlhf.models.resolve import resolve_model_path
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    paths = [resolve_model_path(n) if rank == 1 else None for n in NAMES]
    dist.barrier()
    if rank == 0:  # rank 0 only finds what rank 1 built
        paths = [resolve_model_path(n) for n in NAMES]
    lines = []
    for name, path in zip(NAMES, paths):
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(path)
        ids = torch.tensor([tok("1+2=")["input_ids"]])
        logits = model(ids).logits
        assert torch.isfinite(logits).all(), name
        lines.append(f"{name} {path} {logits.double().sum().item():.6e}")
    Path(out, f"rank{rank}").write_text("\n".join(lines))
    dist.destroy_process_group()


def test_rank1_builds_every_cached_model_into_an_empty_cache(tmp_path):
    cache = tmp_path / "cache"
    spawn(_worker, 2, (str(cache), str(tmp_path)), timeout_s=600)
    r0, r1 = ((tmp_path / f"rank{r}").read_text().splitlines() for r in (0, 1))
    assert r0 == r1 and len(r0) == len(NAMES)  # same directories, same logits on both ranks
    for line in r0:
        assert line.split()[1].startswith(str(cache / "models")), line
