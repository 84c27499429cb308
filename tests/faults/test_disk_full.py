"""Case 4: the disk fills up while a checkpoint is saved (a real DeepSpeed engine saving into a
small tmpfs; RLIMIT_FSIZE where mounting is not allowed). The save must fail with an error
that says the disk is full and where, nothing half-written may count as a checkpoint, and the
previous checkpoint must load with its weights intact."""
import json
import os
import subprocess
import sys
import textwrap

import pytest

from faultlib import REPO

pytestmark = pytest.mark.distributed

SCRIPT = textwrap.dedent("""
    import json, os, resource, shutil, signal, sys, torch
    from pathlib import Path
    from transformers import AutoModelForCausalLM
    from hpc_rlhf.checkpoint.store import list_checkpoints
    from hpc_rlhf.models.tiny import ensure_tiny_model
    from hpc_rlhf.train.deepspeed_strategy import DeepSpeedStrategy, StrategyConfig
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
    step, extra = strat.load_checkpoint(root, {"actor": engine})
    same = all(torch.equal(v, w1[k]) for k, v in engine.module.state_dict().items())
    out.write_text(json.dumps({"err": err, "complete": complete, "step": step, "extra": extra,
                               "same": same, "size1": size1,
                               "left": sorted(p.name for p in root.iterdir())}))
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
                              timeout=150)
    finally:
        if mounted:
            subprocess.run(["umount", str(mnt)], check=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    got = json.loads(result.read_text())
    print(mode, got)
    return got


@pytest.mark.timeout(180)
def test_disk_full_during_save_keeps_previous_checkpoint(full_disk_save):
    got = full_disk_save
    assert got["err"] is not None, "the save into a full disk did not fail"
    # The old checkpoint is intact: listed, loadable, same weights and state; nothing of
    # the failed save counts as a checkpoint.
    assert got["complete"] == [1]
    assert (got["step"], got["extra"]) == (1, {"data_pos": 1}) and got["same"]
    assert "step_00000002" not in got["left"]


@pytest.mark.timeout(180)
def test_disk_full_error_says_disk_full_and_where(full_disk_save):
    err = full_disk_save["err"]
    assert any(w in err for w in ("No space left on device", "File too large", "disk")), err
    assert "small_fs" in err, err   # names the checkpoint location
