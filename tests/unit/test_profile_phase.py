"""HPC_RLHF_PROFILE=PHASE:STEP profiles exactly that phase of that step."""
import pytest
import torch

from hpc_rlhf.runtime.profile import profile_phase

pytestmark = pytest.mark.unit


def test_profiles_only_the_named_phase_and_step(tmp_path, monkeypatch):
    monkeypatch.setenv("HPC_RLHF_PROFILE", "train:2")
    x = torch.randn(64, 64)
    for step in range(3):
        for phase in ("experience", "train"):
            with profile_phase(phase, step, tmp_path, rank=1):
                x @ x
    (out,) = (tmp_path / "logs").iterdir()
    assert out.name == "profile_train_2_rank1.txt"
    assert "aten::mm" in out.read_text()


def test_off_by_default_and_a_bad_value_is_named(tmp_path, monkeypatch):
    monkeypatch.delenv("HPC_RLHF_PROFILE", raising=False)
    with profile_phase("train", 0, tmp_path):
        pass
    assert not (tmp_path / "logs").exists()
    monkeypatch.setenv("HPC_RLHF_PROFILE", "train")
    with pytest.raises(ValueError, match="HPC_RLHF_PROFILE='train'.*PHASE:STEP"):
        with profile_phase("train", 0, tmp_path):
            pass
