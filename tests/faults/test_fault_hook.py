"""The injection hook itself: spec parsing, rank/phase/count matching, no-op when unset."""
import pytest

from hpc_rlhf import faults

pytestmark = pytest.mark.unit


def test_parse_and_bad_specs():
    assert faults.parse("train:1:kill:3") == ("train", 1, "kill", 3)
    assert faults.parse("rollout:0:hang") == ("rollout", 0, "hang", 1)
    for bad in ("train", "train:x:kill", "train:1:explode", "train:1:kill:0", "a:1:kill:2:3"):
        with pytest.raises(ValueError, match="PHASE:RANK:KIND"):
            faults.parse(bad)


def test_fires_only_on_the_named_rank_phase_and_count(monkeypatch):
    monkeypatch.setattr(faults, "_counts", {})
    monkeypatch.delenv(faults.ENV, raising=False)
    faults.fault_point("train")                       # unset: nothing
    monkeypatch.setenv(faults.ENV, "train:1:raise:2")
    monkeypatch.setenv("HPC_RLHF_GLOBAL_RANK", "0")
    faults.fault_point("train")
    faults.fault_point("train")                       # rank 0: never
    monkeypatch.setenv("HPC_RLHF_GLOBAL_RANK", "1")
    monkeypatch.setattr(faults, "_counts", {})
    faults.fault_point("rollout")                     # other phase: not counted
    faults.fault_point("train")                       # 1st time: not yet
    with pytest.raises(faults.FaultInjected, match="injecting raise in train"):
        faults.fault_point("train")
    faults.fault_point("train")                       # only once
