"""GRPO through the launched RL recipe with RingAttention: 2 colocated ranks as one ring of 2
(train.ring_attn_size=2, ring groups from the topology) against the same 2 ranks as 2
data-parallel replicas (ring 1).

Both runs sample the same step-1 rollouts (same weights, same per-rank prompt shards), so step
1's rewards are identical. The micro-batches differ (a ring trains on its members' rows
together), so losses are not compared here: tests/distributed/test_ring_rl.py checks the step's
numbers against ring size 1 on the same batch. What this adds: the launched job trains through
the ring, and after every weight sync the engine's logprobs equal the ring-computed ones.
"""
import math

import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.deepspeed]

STEPS = 3
COMMON = ("rollout.engine=hf", "train.actor_lr=5e-3", f"train.num_steps={STEPS}",
          "checkpoint.save_every=0", "topology.nodes=1", "topology.procs_per_node=2")


def test_grpo_with_ring_attention_trains_and_syncs(tmp_path, rl_job):
    ring1 = rl_job(tmp_path / "ring1", COMMON, nproc=2).metrics
    job = rl_job(tmp_path / "ring2", [*COMMON, "train.ring_attn_size=2"], nproc=2)
    ring2 = job.metrics
    assert "[rl] RingAttention: 1 ring(s) of 2 ranks" in job.log.read_text()
    assert [m["step"] for m in ring2] == list(range(1, STEPS + 1))
    assert ring2[0]["reward/mean"] == ring1[0]["reward/mean"]
    for m in ring2:
        assert math.isfinite(m["loss/policy"]) and m["advantage/abs_mean"] > 0
        assert m["rollout/logprob_gap_mean"] < 1e-4, m   # engine == ring-trained weights
    # The policy moved: the sampled responses' rewards/entropies are not frozen at step 1.
    assert len({round(m["policy/entropy"], 6) for m in ring2}) > 1
