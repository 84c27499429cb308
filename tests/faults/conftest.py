"""Fixtures of the fault suite: one uninterrupted RL run that every resumed run is compared to."""
import pytest

from rljob import STEPS, metrics, run_rl


@pytest.fixture(scope="session")
def reference_metrics(tmp_path_factory):
    """Per-step metrics of an uninterrupted grpo_tiny job (2 ranks, HF engine, STEPS steps)."""
    run_dir = tmp_path_factory.mktemp("reference")
    rc, out, _ = run_rl(run_dir, ["checkpoint.save_every=0"])
    assert rc == 0, out[-5000:]
    got = metrics(run_dir)
    assert sorted(got) == list(range(1, STEPS + 1))
    return got
