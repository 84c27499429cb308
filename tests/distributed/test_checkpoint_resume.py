"""Checkpoints with real DeepSpeed: exact resume on 2 ranks, and a save killed half-way."""
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from distlib import init_rank, run_ranks

pytestmark = [pytest.mark.distributed, pytest.mark.deepspeed]

SAVE_AT, MORE = 3, 5
EXPORT_PROBE = torch.arange(10, 40).view(2, 15)


def _train_steps(strat, engine, n, start_pos):
    """n steps; each batch drawn from the global torch RNG (so RNG restore matters)."""
    losses = []
    pos = start_pos
    for _ in range(n):
        g = torch.randint(7, 100, (4, 20))                    # same RNG stream on every rank
        x = g[strat.dp_rank * 2:(strat.dp_rank + 1) * 2]
        loss = engine(input_ids=x, labels=x).loss
        strat.backward(loss, engine)
        strat.step(engine)
        losses.append(strat.all_reduce_mean(loss.item()))
        pos += 1
    return losses, pos


def _resume_worker(rank, world, port, model_path, out_dir, phase):
    init_rank(rank, world, port)
    from transformers import AutoModelForCausalLM

    from hpc_rlhf.engine.deepspeed_strategy import DeepSpeedStrategy, StrategyConfig
    strat = DeepSpeedStrategy(StrategyConfig(zero_stage=3, micro_batch_size=2, lr=3e-3,
                                             warmup_steps=2, scheduler="linear", total_steps=20,
                                             weight_decay=0.01))
    strat.setup_distributed()
    engine = strat.prepare_model(AutoModelForCausalLM.from_pretrained(model_path))
    root = os.path.join(out_dir, "ckpt")
    if phase == "full":
        first, pos = _train_steps(strat, engine, SAVE_AT, 0)
        strat.save_checkpoint(root, SAVE_AT, {"actor": engine}, {"data_pos": pos}, keep_last=2)
        rest, _ = _train_steps(strat, engine, MORE, pos)
        result = {"first": first, "rest": rest}
        # Export the sharded ZeRO-3 model (collective) and record the engine's own logits.
        from hpc_rlhf.checkpoint.export import export_hf
        export_hf(engine, os.path.join(out_dir, "export"), strategy=strat)
        with torch.no_grad():
            logits = engine(input_ids=EXPORT_PROBE).logits
        if rank == 0:
            torch.save(logits, os.path.join(out_dir, "engine_logits.pt"))
    else:
        torch.manual_seed(999)  # a fresh process with a different RNG
        step, extra = strat.load_checkpoint(root, {"actor": engine})
        rest, _ = _train_steps(strat, engine, MORE, extra["data_pos"])
        result = {"step": step, "extra": extra, "rest": rest}
    if rank == 0:
        with open(os.path.join(out_dir, f"{phase}.json"), "w") as f:
            json.dump(result, f)


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    from hpc_rlhf.models.tiny import ensure_tiny_model
    return ensure_tiny_model(tmp_path_factory.mktemp("models"))


@pytest.mark.timeout(300)
def test_zero3_resume_gives_identical_losses(tiny_path, tmp_path):
    run_ranks(_resume_worker, 2, (str(tiny_path), str(tmp_path), "full"), timeout_s=150)
    run_ranks(_resume_worker, 2, (str(tiny_path), str(tmp_path), "resume"), timeout_s=150)
    full = json.loads((tmp_path / "full.json").read_text())
    resumed = json.loads((tmp_path / "resume.json").read_text())
    assert resumed["step"] == SAVE_AT and resumed["extra"] == {"data_pos": SAVE_AT}
    print("uninterrupted", full["rest"], "\nresumed      ", resumed["rest"])
    assert resumed["rest"] == full["rest"]  # bit-identical, not just close
    assert full["rest"][-1] < full["first"][0]
    # The ZeRO-3 export is a plain HF model with the trained weights.
    from transformers import AutoModelForCausalLM
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "export").eval()
    with torch.no_grad():
        got = exported(input_ids=EXPORT_PROBE).logits
        base = AutoModelForCausalLM.from_pretrained(tiny_path)(input_ids=EXPORT_PROBE).logits
    want = torch.load(tmp_path / "engine_logits.pt")
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert (got - base).abs().max() > 1e-2


KILLED_SAVE = textwrap.dedent("""
    import os, sys, time, torch
    from pathlib import Path
    from transformers import AutoModelForCausalLM
    import hpc_rlhf.checkpoint.store as store
    from hpc_rlhf.engine.deepspeed_strategy import DeepSpeedStrategy, StrategyConfig
    model_path, root, marker = sys.argv[1:4]
    torch.set_num_threads(1)
    strat = DeepSpeedStrategy(StrategyConfig(zero_stage=2, micro_batch_size=2, lr=1e-2))
    strat.setup_distributed()
    engine = strat.prepare_model(AutoModelForCausalLM.from_pretrained(model_path))
    def train():
        x = torch.randint(7, 100, (2, 16))
        strat.backward(engine(input_ids=x, labels=x).loss, engine)
        strat.step(engine)
    train()
    strat.save_checkpoint(root, 1, {"actor": engine}, {"data_pos": 1})
    torch.save({k: v.clone() for k, v in engine.module.state_dict().items()}, marker + ".w1")
    train()
    real_fsync = store._fsync_tree
    def fsync_then_hang(path):  # the second save has written its files: die before the commit
        real_fsync(path)
        Path(marker).write_text("in save")
        time.sleep(600)
    store._fsync_tree = fsync_then_hang
    strat.save_checkpoint(root, 2, {"actor": engine}, {"data_pos": 2})
""")


@pytest.fixture
def in_process_world():
    """The load-back below joins a 1-rank world in the pytest process itself: restore the
    environment (RANK, MASTER_PORT, ...) and drop the group afterwards, or later tests that
    start jobs inherit a rank and a port that is already taken."""
    keys = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    saved = {k: os.environ.pop(k) for k in keys if k in os.environ}
    yield
    import torch.distributed as dist
    if dist.is_initialized():
        dist.destroy_process_group()
    for k in keys:
        os.environ.pop(k, None)
    os.environ.update(saved)


@pytest.mark.timeout(300)
def test_kill_during_save_keeps_previous_checkpoint(tiny_path, tmp_path, in_process_world):
    from transformers import AutoModelForCausalLM

    from hpc_rlhf.checkpoint.store import latest_checkpoint, list_checkpoints
    from hpc_rlhf.engine.deepspeed_strategy import DeepSpeedStrategy, StrategyConfig
    root, marker = tmp_path / "ckpt", tmp_path / "marker"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_PORT")}
    proc = subprocess.Popen([sys.executable, "-c", KILLED_SAVE, str(tiny_path), str(root),
                             str(marker)], env=env, cwd=os.getcwd())
    try:
        deadline = time.monotonic() + 180
        while not marker.exists():
            assert proc.poll() is None, f"save script exited early with {proc.returncode}"
            assert time.monotonic() < deadline, "save script never reached the second save"
            time.sleep(0.2)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert any(p.name.startswith(".tmp-step_00000002") for p in root.iterdir())  # half-written
    assert [s for s, _ in list_checkpoints(root)] == [1]
    assert latest_checkpoint(root).name == "step_00000001"

    # The previous checkpoint loads, and holds the weights of step 1.
    strat = DeepSpeedStrategy(StrategyConfig(zero_stage=2, micro_batch_size=2, lr=1e-2))
    strat.setup_distributed()
    engine = strat.prepare_model(AutoModelForCausalLM.from_pretrained(tiny_path))
    step, extra = strat.load_checkpoint(root, {"actor": engine})
    assert (step, extra) == (1, {"data_pos": 1})
    want = torch.load(str(marker) + ".w1")
    for k, v in engine.module.state_dict().items():
        assert torch.equal(v, want[k]), k
    # A later save at the same root cleans the killed temp dir and commits normally.
    strat.save_checkpoint(root, 2, {"actor": engine}, {"data_pos": 2}, keep_last=1)
    assert [p.name for p in root.iterdir()] == ["step_00000002"]
