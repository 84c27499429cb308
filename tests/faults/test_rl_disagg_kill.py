"""A rollout-only rank SIGKILLed in disaggregated mode (hpc_rlhf/recipes/rl/disaggregated.py):
rank 0 trains (DeepSpeed ZeRO-3, HF-engine GRPO on the tiny Llama), rank 1 only serves
rollouts. The kill lands in the rollout rank's generation of step 3 (fault point "rollout" in
`_serve`). The job must end non-zero within 60 s with torchrun naming rank 1 and SIGKILL, and
the newest complete checkpoint must load: the resumed job reproduces an uninterrupted
disaggregated run."""
import json

import pytest

from rljob import (STEPS, TIMING_PREFIXES, assert_same_metrics, metrics, rank_failure,
                   root_cause, run_rl)
from testlib import scaled

from hpc_rlhf.checkpoint.store import list_checkpoints

pytestmark = pytest.mark.distributed
DISAGG = ["topology.mode=disaggregated", "rollout.num_engines=1",
          "rollout.tensor_parallel_size=1", "topology.backend=gloo", "checkpoint.save_every=1"]
# Wall-time metrics of the disaggregated recipe, besides time/ and throughput/.
TIMING = (*TIMING_PREFIXES, "rollout/generate_s", "weight_sync/seconds", "weight_sync/gb_per_s")


@pytest.mark.timeout(scaled(400))
def test_rollout_rank_killed_fails_fast_and_checkpoint_resumes(tmp_path):
    rc, out, _ = run_rl(tmp_path / "reference", DISAGG)
    assert rc == 0, out[-5000:]
    reference = metrics(tmp_path / "reference")
    assert sorted(reference) == list(range(1, STEPS + 1))
    assert "rollout world 'rollout0'" in out          # rank 1 really is a rollout-only rank

    run = tmp_path / "killed"
    rc, out, secs = run_rl(run, DISAGG, fault="rollout:1:kill:3")
    print(f"failed {secs:.1f}s after the kill")
    assert rc != 0, out[-5000:]
    assert secs is not None, f"no fault-injection line: {out[-5000:]}"
    assert secs < scaled(60), f"job took {secs:.0f}s to fail after the kill"
    assert "[rank 1] HPC_RLHF_FAULT: injecting kill in rollout (time 3)" in out
    entry = rank_failure(out, 1)   # torchrun's summary names rank 1 and its signal
    assert "SIGKILL" in entry or "Signal 9" in entry, root_cause(out)[:3000]
    assert max(metrics(run)) == 2                     # step 3's rollouts never arrived
    # Checkpoint 2 is saved while the engine generates step 3; torchrun may stop rank 0 during
    # that save, so the newest complete checkpoint is 2, or 1 with a .tmp- dir left behind.
    saved = [s for s, _ in list_checkpoints(run / "checkpoints")]
    assert saved in ([1, 2], [1]), saved
    k = saved[-1]

    rc, out, _ = run_rl(run, DISAGG)                  # the requeued job
    assert rc == 0, out[-5000:]
    logged = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()
              if line.strip()]
    assert logged == [1, 2, *range(k + 1, STEPS + 1)], logged   # resumed at k, not at 0
    n = assert_same_metrics(metrics(run), reference, range(k + 1, STEPS + 1), TIMING)
    assert n >= 12 * (STEPS - k)
    assert [s for s, _ in list_checkpoints(run / "checkpoints")][-1] == STEPS
