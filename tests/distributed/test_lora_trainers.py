"""LoRA in the supervised and preference trainers (model.lora_rank > 0), 2 CPU ranks, ZeRO-3:
only adapters train. Read through the public output: the merged export equals the initial
model bit for bit outside the adapted projections, and each adapted projection moved by an
update of rank <= lora_rank; tensorboard holds the loss curve of every step."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from distlib import ROOT, init_rank, private_model_cache, read_metrics
from testlib import spawn

pytestmark = [pytest.mark.distributed, pytest.mark.deepspeed]

TRAINERS = ("sft", "dpo")
RANK, STEPS, TIMEOUT_S = 4, 3, 240
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")   # model.lora_targets' default


def _worker(rank: int, world: int, port: int, tmp: str) -> None:
    init_rank(rank, world, port)
    import torch.distributed as dist
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from hpc_rlhf.config import load_config
    data = Path(tmp) / "data"
    for name in TRAINERS:
        kind = "sft" if name == "sft" else "pairs"
        cfg = load_config(ROOT / "configs" / f"{name}_tiny.yaml", [
            f"data.prompts={data / f'{kind}_train.jsonl'}", "data.eval_prompts=",
            f"model.lora_rank={RANK}", "model.lora_alpha=8", "train.actor_lr=2e-2",
            f"train.num_steps={STEPS}", "checkpoint.export_hf=true",
            "logging.tensorboard=true", "logging.progress_bar=false"])
        __import__(f"hpc_rlhf.recipes.{name}", fromlist=["run"]).run(cfg, None, Path(tmp) / name)
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from hpc_rlhf.data.synthetic import write_toy_datasets
    from hpc_rlhf.models.resolve import cache_dir
    from hpc_rlhf.models.tiny import ensure_tiny_model
    tmp = tmp_path_factory.mktemp("lora_trainers")
    write_toy_datasets(tmp / "data", n_train=64, n_eval=8)
    with private_model_cache(tmp / "cache"):
        base = ensure_tiny_model(cache_dir() / "models", arch="llama")
        spawn(_worker, 2, (str(tmp),), TIMEOUT_S)
    return tmp, Path(base)


def _weights(path: Path) -> dict:
    from transformers import AutoModelForCausalLM
    return {k: v.detach().clone() for k, v in
            AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).state_dict().items()}


@pytest.mark.parametrize("trainer", TRAINERS)
def test_lora_trains_only_adapters(runs, trainer):
    tmp, base = runs
    before, after = _weights(base), _weights(tmp / trainer / "export")
    assert before.keys() == after.keys()
    adapted = [k for k in before if any(f"{t}.weight" in k for t in TARGETS)]
    assert adapted, sorted(before)
    for name in before:
        if name in adapted:
            delta = after[name] - before[name]
            assert delta.abs().max() > 0, f"{name} did not move: the adapters did not train"
            sv = torch.linalg.svdvals(delta)     # rank <= RANK, up to fp32 rounding of W + BA
            assert (sv[RANK:] <= 1e-3 * sv[0]).all(), (name, sv[:RANK + 2])
        else:   # frozen: bit-identical
            assert torch.equal(after[name], before[name]), f"{name} changed under LoRA"


@pytest.mark.parametrize("trainer", TRAINERS)
def test_lora_run_logs_tensorboard_and_metrics(runs, trainer):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    tmp, _ = runs
    rows = read_metrics(tmp / trainer)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    events = EventAccumulator(str(tmp / trainer / "tensorboard"))
    events.Reload()
    curve = events.Scalars("loss")
    assert [e.step for e in curve] == list(range(1, STEPS + 1))
    assert [e.value for e in curve] == pytest.approx([r["loss"] for r in rows], rel=1e-6)
