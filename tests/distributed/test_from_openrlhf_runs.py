"""Configs converted from OpenRLHF's README command lines (SFT, DPO, RM: see
tests/unit/test_from_openrlhf.py) train one step on the tiny model, with only what this machine
forces overridden: the model (tiny:llama instead of an 8B hub id), the data (local toy files
instead of hub datasets), float32/eager attention on CPU, one rank and small batches."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

from distlib import read_metrics
from testlib import spawn

pytestmark = [pytest.mark.distributed, pytest.mark.deepspeed]

LOCAL = ["model.path=tiny:llama", "model.dtype=float32", "model.attn_implementation=auto",
         "data.eval_prompts=", "train.num_steps=1", "train.batch_size=4",
         "train.micro_batch_size=2", "topology.procs_per_node=1", "data.max_len=128",
         "data.input_key=prompt"]  # the toy files name their prompt field "prompt"


def _worker(rank: int, world: int, port: int, tmp: str) -> None:
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import torch
    torch.set_num_threads(1)
    from hpc_rlhf.config import load_config
    tmp = Path(tmp)
    for name, data in (("sft", "sft_train.jsonl"), ("dpo", "pairs_train.jsonl"),
                       ("rm", "pairs_train.jsonl")):
        cfg = load_config(tmp / f"{name}.yaml", [*LOCAL, f"data.prompts={tmp / data}"])
        module = __import__(f"hpc_rlhf.recipes.{cfg.train.trainer}", fromlist=["run"])
        module.run(cfg, None, tmp / f"run_{name}")


def test_converted_readme_commands_train_one_step(tmp_path):
    import openrlhf_commands as cmds

    from hpc_rlhf.config.openrlhf import convert, to_nested
    from hpc_rlhf.data.synthetic import write_toy_datasets
    from hpc_rlhf.models.resolve import cache_dir
    from hpc_rlhf.models.tiny import ensure_tiny_model
    write_toy_datasets(tmp_path, n_train=16, n_eval=4)
    for name, argv in (("sft", cmds.SFT), ("dpo", cmds.DPO), ("rm", cmds.RM)):
        values = convert(argv).values
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(to_nested(values)))
    ensure_tiny_model(cache_dir() / "models", arch="llama")
    spawn(_worker, 1, (str(tmp_path),), 600)
    for name in ("sft", "dpo", "rm"):
        rows = [r for r in read_metrics(tmp_path / f"run_{name}") if r["step"] > 0]
        assert [r["step"] for r in rows] == [1] and rows[0]["loss"] > 0, (name, rows)
