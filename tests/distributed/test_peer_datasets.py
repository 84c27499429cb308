"""OpenRLHF / TRL dataset layouts train: SFT with message-list completions, DPO with
conversational pairs (a prompt conversation, chosen/rejected as one assistant message each),
KTO with message-list completions, each read from a `datasets.save_to_disk`-style DatasetDict.
Each trains 2 steps and must log the very losses the plain-string JSONL of the same rows gives
(same samples, same seed). One rank, DeepSpeed ZeRO-3 on gloo, through each recipe's run()."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pyarrow as pa
import pytest

from distlib import ROOT, read_metrics
from testlib import spawn

pytestmark = [pytest.mark.distributed, pytest.mark.deepspeed]

RUNS = {  # name -> (trainer, config, toy kind)
    "sft": ("sft", "sft_tiny.yaml", "sft"),
    "dpo": ("dpo", "dpo_tiny.yaml", "pairs"),
    "kto": ("kto", "sft_tiny.yaml", "kto"),
}


def _as_messages(kind: str, row: dict) -> dict:
    user = [{"role": "user", "content": row["prompt"]}]
    if kind == "pairs":
        return {"prompt": user, "chosen": [{"role": "assistant", "content": row["chosen"]}],
                "rejected": [{"role": "assistant", "content": row["rejected"]}]}
    out = {"prompt": user, "response": [{"role": "assistant", "content": row["response"]}]}
    return out | ({"label": row["label"]} if "label" in row else {})


def _write_datasetdict(directory: Path, rows: list[dict]) -> None:
    split = directory / "train"
    split.mkdir(parents=True)
    table = pa.Table.from_pylist(rows)
    with pa.OSFile(str(split / "data-00000-of-00001.arrow"), "wb") as sink:
        with pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table)
    (split / "state.json").write_text(json.dumps({"_data_files": [
        {"filename": "data-00000-of-00001.arrow"}]}))
    (directory / "dataset_dict.json").write_text(json.dumps({"splits": ["train"]}))


def _worker(rank: int, world: int, port: int, tmp: str) -> None:
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import torch
    torch.set_num_threads(1)
    from hpc_rlhf.config import load_config
    tmp = Path(tmp)
    for name, (trainer, config, kind) in RUNS.items():
        module = __import__(f"hpc_rlhf.recipes.{trainer}", fromlist=["run"])
        for form, data in (("plain", tmp / f"{kind}_train.jsonl"), ("peer", tmp / f"{kind}_dd")):
            cfg = load_config(ROOT / "configs" / config, [
                f"train.trainer={trainer}", f"data.prompts={data}", "data.eval_prompts=",
                "train.num_steps=2", "train.batch_size=4", "train.micro_batch_size=4",
                "topology.procs_per_node=1", "logging.log_every=100", "data.packing=false"])
            module.run(cfg, None, tmp / f"{name}_{form}")


def test_peer_layouts_train_as_the_plain_form(tmp_path):
    from hpc_rlhf.data.synthetic import toy_rows
    from hpc_rlhf.models.resolve import cache_dir
    from hpc_rlhf.models.tiny import ensure_tiny_model
    for _, _, kind in RUNS.values():
        rows = toy_rows(kind, 16, seed=5)
        (tmp_path / f"{kind}_train.jsonl").write_text(
            "".join(json.dumps(r) + "\n" for r in rows))
        _write_datasetdict(tmp_path / f"{kind}_dd", [_as_messages(kind, r) for r in rows])
    ensure_tiny_model(cache_dir() / "models", arch="llama")
    spawn(_worker, 1, (str(tmp_path),), 600)
    for name in RUNS:
        plain = [r for r in read_metrics(tmp_path / f"{name}_plain") if r["step"] > 0]
        peer = [r for r in read_metrics(tmp_path / f"{name}_peer") if r["step"] > 0]
        assert [r["step"] for r in peer] == [1, 2], (name, peer)
        for a, b in zip(plain, peer):
            assert b["loss"] == pytest.approx(a["loss"], abs=1e-6), (name, a, b)


def _prm_worker(rank: int, world: int, port: int, tmp: str) -> None:
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import torch
    torch.set_num_threads(1)
    from hpc_rlhf.config import load_config
    from hpc_rlhf.recipes import prm
    cfg = load_config(ROOT / "configs" / "sft_tiny.yaml", [
        "train.trainer=prm", f"data.prompts={Path(tmp) / 'prm.jsonl'}", "data.eval_prompts=",
        "data.input_key=input", "data.label_key=value", "data.prm_step_tag=#",
        "train.num_steps=2", "train.batch_size=4", "train.micro_batch_size=4",
        "topology.procs_per_node=1", "logging.log_every=100", "data.packing=false"])
    prm.run(cfg, None, Path(tmp) / "prm")


def test_openrlhf_prm_rows_with_soft_labels_train(tmp_path):
    """OpenRLHF's PRM rows: one text with the placeholder after each step and soft labels."""
    import random
    from hpc_rlhf.models.resolve import cache_dir
    from hpc_rlhf.models.tiny import ensure_tiny_model
    rng = random.Random(0)
    rows = [{"input": f"{a}+{b}=? step {a + b}# check {a + b}#",
             "value": [round(rng.random(), 2), rng.choice([0.0, 1.0])]}
            for a in range(4) for b in range(2)]
    (tmp_path / "prm.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    ensure_tiny_model(cache_dir() / "models", arch="llama")
    spawn(_prm_worker, 1, (str(tmp_path),), 300)
    got = [r for r in read_metrics(tmp_path / "prm") if r["step"] > 0]
    assert [r["step"] for r in got] == [1, 2]
    assert all(0 < r["loss"] < 10 for r in got), got
