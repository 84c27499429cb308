"""Pure parts of the DeepSpeed strategy (no processes): config validation, schedule, DS JSON,
and the stale JIT-build lock cleaner. Lives beside the DeepSpeed tests it supports."""
import math
import os
import subprocess
import sys
import time

import pytest

from hpc_rlhf.engine.deepspeed_strategy import (StrategyConfig, build_ds_config,
                                                effective_zero_stage, lr_factor)
from hpc_rlhf.engine.op_cache import clear_stale_locks, ensure_extensions_dir

pytestmark = pytest.mark.unit


def test_config_errors_name_field_and_fix():
    with pytest.raises(ValueError) as e:
        StrategyConfig(zero_stage=4, offload_params=True, scheduler="cosine", total_steps=0)
    msg = str(e.value)
    assert "zero_stage=4" in msg and "offload_params=True needs zero_stage=3" in msg
    assert "needs total_steps=0 > warmup_steps=0" in msg


def test_lr_schedule_naive():
    cfg = StrategyConfig(lr=1.0, warmup_steps=2, scheduler="cosine", total_steps=6,
                         min_lr_ratio=0.0)
    got = [lr_factor(cfg, s) for s in range(7)]
    want = [0.5, 1.0] + [0.5 * (1 + math.cos(math.pi * k / 4)) for k in range(5)]
    assert got == pytest.approx(want)
    lin = StrategyConfig(scheduler="linear", total_steps=10, min_lr_ratio=0.2)
    assert lr_factor(lin, 0) == 1.0 and lr_factor(lin, 10) == pytest.approx(0.2)


def test_ds_config_cpu_and_gpu_optimizers():
    cfg = StrategyConfig(zero_stage=3, offload_optimizer=True, offload_params=True,
                         ref_offload=True, autotp_size=2, grad_accum=4)
    cpu = build_ds_config(cfg)
    assert cpu["optimizer"]["params"]["torch_adam"] is True
    assert cpu["zero_optimization"]["offload_param"]["device"] == "cpu"
    assert cpu["tensor_parallel"] == {"autotp_size": 2}
    assert cpu["gradient_accumulation_steps"] == 4
    gpu = build_ds_config(cfg, on_cuda=True)
    assert "torch_adam" not in gpu["optimizer"]["params"]
    ref = build_ds_config(cfg, train=False)
    assert "optimizer" not in ref and ref["zero_optimization"]["stage"] == 3
    assert build_ds_config(StrategyConfig(zero_stage=2), train=False)["zero_optimization"] == {
        "stage": 0}


def test_one_cpu_rank_runs_stage_0_unless_offload_or_gpu_needs_zero():
    z3 = StrategyConfig(zero_stage=3)
    assert effective_zero_stage(z3, 1) == 0                        # nothing to partition
    assert effective_zero_stage(z3, 2) == 3
    assert effective_zero_stage(z3, 1, on_cuda=True) == 3          # colocated GPU offload
    assert effective_zero_stage(StrategyConfig(zero_stage=2, offload_optimizer=True), 1) == 2
    assert effective_zero_stage(StrategyConfig(zero_stage=3, offload_params=True), 1) == 3
    ref = StrategyConfig(zero_stage=3, ref_offload=True)
    assert effective_zero_stage(ref, 1, train=False) == 3          # frozen model on CPU
    assert effective_zero_stage(ref, 1, train=True) == 0


def test_clear_stale_locks(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "ext"))
    root = ensure_extensions_dir()
    assert root == tmp_path / "ext" and root.is_dir()
    old = time.time() - 3600
    stale, fresh, held = (root / n / "lock" for n in ("stale_op", "fresh_op", "held_op"))
    for lock in (stale, fresh, held):
        lock.parent.mkdir()
        lock.touch()
    os.utime(stale, (old, old))
    os.utime(held, (old, old))
    # A live builder: another process keeps the lock open, as torch's FileBaton does.
    holder = subprocess.Popen([sys.executable, "-c",
                               f"import os,time; fd=os.open({str(held)!r}, os.O_RDONLY); "
                               "print('ok', flush=True); time.sleep(60)"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "ok"
        removed = clear_stale_locks(min_age_s=180)
    finally:
        holder.kill()
        holder.wait()
    assert removed == [stale]
    assert not stale.exists() and fresh.exists() and held.exists()
    assert clear_stale_locks(min_age_s=180) == [held]   # its holder is gone now
