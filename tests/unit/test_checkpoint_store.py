"""Checkpoint directory rules without DeepSpeed: only committed, COMPLETE steps count."""
import random

import pytest
import torch

from hpc_rlhf.checkpoint.store import (_commit, latest_checkpoint, list_checkpoints, rng_state,
                                       set_rng_state, save_checkpoint)

pytestmark = pytest.mark.unit


def test_latest_ignores_temp_and_incomplete(tmp_path):
    assert latest_checkpoint(tmp_path / "missing") is None
    for step in (5, 20):
        tmp = tmp_path / f".tmp-step_{step:08d}"
        tmp.mkdir()
        _commit(tmp, tmp_path / f"step_{step:08d}", {"step": step})
    (tmp_path / "step_00000030").mkdir()            # no COMPLETE: a foreign or broken dir
    (tmp_path / ".tmp-step_00000040").mkdir()      # a save in progress
    assert [s for s, _ in list_checkpoints(tmp_path)] == [5, 20]
    assert latest_checkpoint(tmp_path).name == "step_00000020"


def test_rng_round_trip():
    state = rng_state()
    a = (random.random(), torch.rand(3).tolist())
    set_rng_state(state)
    assert (random.random(), torch.rand(3).tolist()) == a


def test_keep_last_validated(tmp_path):
    with pytest.raises(ValueError, match="keep_last=0"):
        save_checkpoint(tmp_path, 1, {}, keep_last=0)


def test_save_without_engines_keeps_last_k(tmp_path):
    for step in range(1, 5):
        save_checkpoint(tmp_path, step, {}, {"pos": step}, keep_last=2)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [3, 4]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000003", "step_00000004"]
