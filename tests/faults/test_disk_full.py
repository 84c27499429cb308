"""Case 4: the disk fills up while a checkpoint is saved (a real DeepSpeed engine saving into a
small tmpfs; RLIMIT_FSIZE where mounting is not allowed). The save must fail with an error
that says the disk is full and where, nothing half-written may count as a checkpoint, and the
previous checkpoint must load with its weights intact, and the failed save leaves nothing
behind (its partial .tmp- directory is removed, so the space is free again)."""
import json
import os
import re
import subprocess
import sys
import textwrap

import pytest

from testlib import REPO, scaled

pytestmark = pytest.mark.distributed

SCRIPT = textwrap.dedent("""
    import json, os, resource, shutil, signal, sys, torch
    from pathlib import Path
    from transformers import AutoModelForCausalLM
    from hpc_rlhf.checkpoint.store import list_checkpoints
    from hpc_rlhf.models.tiny import ensure_tiny_model
    from hpc_rlhf.engine.deepspeed_strategy import DeepSpeedStrategy, StrategyConfig
    root, mode, out = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model_path = ensure_tiny_model(out.parent / "model")
    strat = DeepSpeedStrategy(StrategyConfig(zero_stage=2, micro_batch_size=2, lr=1e-2))
    strat.setup_distributed()
    engine = strat.prepare_model(AutoModelForCausalLM.from_pretrained(model_path))
    def train():
        x = torch.randint(7, 100, (2, 16))
        strat.backward(engine(input_ids=x, labels=x).loss, engine)
        strat.step(engine)
    train()
    strat.save_checkpoint(root, 1, {"actor": engine}, {"data_pos": 1})
    w1 = {k: v.clone() for k, v in engine.module.state_dict().items()}
    size1 = sum(f.stat().st_size for f in (root / "step_00000001").rglob("*") if f.is_file())
    train()
    filler = root.parent / "filler"
    if mode == "tmpfs":   # leave 64 KiB free: far less than one checkpoint
        free = shutil.disk_usage(root).free
        with open(filler, "wb") as f:
            f.write(b"\\0" * max(free - 65536, 0))
    else:                 # no file may grow past 64 KiB; EFBIG instead of SIGXFSZ
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (65536, resource.RLIM_INFINITY))
    err = None
    try:
        strat.save_checkpoint(root, 2, {"actor": engine}, {"data_pos": 2})
    except BaseException as e:   # what a user would see
        err = f"{type(e).__name__}: {e}"
    if mode == "tmpfs":
        filler.unlink()
    else:
        resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY,) * 2)
    complete = [s for s, _ in list_checkpoints(root)]
    left = sorted(p.name for p in root.iterdir())
    step, extra = strat.load_checkpoint(root, {"actor": engine})
    same = all(torch.equal(v, w1[k]) for k, v in engine.module.state_dict().items())
    strat.save_checkpoint(root, 3, {"actor": engine}, {"data_pos": 3})   # space freed again
    out.write_text(json.dumps({"err": err, "complete": complete, "step": step, "extra": extra,
                               "same": same, "size1": size1, "left": left, "root": str(root),
                               "after_next_save": sorted(p.name for p in root.iterdir())}))
""")


def _try_mount(mnt, size_mb) -> bool:
    if os.geteuid() != 0:
        return False
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mb}m", "tmpfs", str(mnt)],
                       capture_output=True)
    return r.returncode == 0


@pytest.fixture(scope="module")
def full_disk_save(tmp_path_factory):
    """Run SCRIPT once: checkpoint 1 fits, checkpoint 2 hits the full disk."""
    tmp_path = tmp_path_factory.mktemp("disk_full")
    mnt = tmp_path / "small_fs"
    mounted = _try_mount(mnt, 32)
    mode = "tmpfs" if mounted else "rlimit"
    if not mounted:
        mnt.mkdir(exist_ok=True)
    result = tmp_path / "result.json"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    try:
        proc = subprocess.run([sys.executable, "-c", SCRIPT, str(mnt / "ckpt"), mode,
                               str(result)], cwd=REPO, env=env, capture_output=True, text=True,
                              timeout=scaled(150))
    finally:
        if mounted:
            subprocess.run(["umount", str(mnt)], check=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    got = json.loads(result.read_text())
    print(mode, got)
    return {**got, "mode": mode}


@pytest.mark.timeout(scaled(180))
def test_disk_full_during_save_keeps_previous_checkpoint(full_disk_save):
    got = full_disk_save
    assert got["err"] is not None, "the save into a full disk did not fail"
    # The old checkpoint is intact: listed, loadable, same weights and state; nothing of
    # the failed save counts as a checkpoint.
    assert got["complete"] == [1]
    assert (got["step"], got["extra"]) == (1, {"data_pos": 1}) and got["same"]
    # The failed save left nothing: only the previous checkpoint is there.
    assert got["left"] == ["step_00000001"], got["left"]
    assert got["after_next_save"] == ["step_00000001", "step_00000003"], got["after_next_save"]


@pytest.mark.timeout(scaled(180))
def test_disk_full_error_says_disk_full_and_where(full_disk_save):
    got = full_disk_save
    err, root = got["err"], got["root"]
    # hpc_rlhf/checkpoint/store.py: CheckpointWriteError naming the rank, the step and the
    # directory being written, the writer's own error, and the free space left under the root.
    head = (f"CheckpointWriteError: rank 0: writing checkpoint step 2 into {root}/"
            ".tmp-step_00000002 failed (")
    assert err.startswith(head), err
    cause = err[len(head):].split("). The disk may be full or over quota: ", 1)
    assert len(cause) == 2, err
    # The OS's ENOSPC / EFBIG, or torch's zip writer, which reports a short write as
    # "unexpected pos" (it drops the errno).
    assert re.search(r"No space left on device|File too large|unexpected pos \d+ vs \d+",
                     cause[0]), cause[0]
    free = re.fullmatch(r"([\d.]+) MiB free under (\S+)\. The previous checkpoint is intact.*",
                        cause[1])
    assert free and free.group(2) == root, cause[1]
    if got["mode"] == "tmpfs":   # the filler left 64 KiB
        assert float(free.group(1)) < 1.0, err
