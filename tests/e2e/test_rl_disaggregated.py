"""Disaggregated GRPO under torchrun: ranks 0-2 train (DeepSpeed ZeRO-3, one actor world),
rank 3 serves one vLLM engine in its own default world; weights travel over the gloo sync group
after every step. The engine's logprobs must equal the trainers' at every step (gap < 1e-4;
measured ~2e-7), which fails if a bucket is lost, mis-ordered or never loaded, or if the
trainers' shared-prompt forwards were wrong."""
import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.vllm, pytest.mark.deepspeed, pytest.mark.distributed]

STEPS = 3
DISAGG = ("topology.mode=disaggregated", "topology.nodes=1", "topology.procs_per_node=4",
          "topology.backend=gloo", "topology.timeout_s=240", "rollout.engine=vllm",
          "rollout.num_engines=1", "rollout.prompts_per_step=6", "rollout.n_samples_per_prompt=4",
          "train.batch_size=24", "train.micro_batch_size=4", "train.actor_lr=5e-3",
          f"train.num_steps={STEPS}", "checkpoint.save_every=0",
          # shared-prompt forwards and a token budget: the ZeRO-3 ranks must agree on their
          # micro-batch counts, and the trunk/head calls must gather their shards
          "train.shared_prompt=true", "train.max_tokens_per_micro_batch=96")


def test_disaggregated_vllm_four_ranks_stays_synced(tmp_path, rl_job):
    job = rl_job(tmp_path / "disagg", DISAGG, nproc=4, timeout_s=420)
    rows = job.metrics
    assert [m["step"] for m in rows] == list(range(1, STEPS + 1))
    gaps = [m["rollout/logprob_gap_mean"] for m in rows]
    assert max(gaps) < 1e-4, f"rollout engine and trainers disagree (weight sync?): {gaps}"
    assert all(0.0 <= m["reward/mean"] <= 1.0 for m in rows)
    # the ZeRO-3 gather wrote every weight into the sender's staging ring: nothing was packed
    assert all(m["weight_sync/bytes"] > 0 and m["weight_sync/packed_tensors"] == 0 for m in rows)
    assert (job.run_dir / "checkpoints").is_dir()   # the final checkpoint
