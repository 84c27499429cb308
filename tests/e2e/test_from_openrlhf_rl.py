"""The GRPO and PPO command lines of OpenRLHF's README (tests/openrlhf_commands.py), converted by
`python -m hpc_rlhf.config from-openrlhf`, runs one RL step through the real entry point with
an OpenRLHF-style reward function. Overridden only what this machine forces: the tiny model
instead of a 7B hub id, float32/eager on CPU, one rank with one HF engine, small batches."""
import json
import math

import pytest

from hpc_rlhf.config.__main__ import main
from openrlhf_commands import GRPO

pytestmark = [pytest.mark.e2e, pytest.mark.deepspeed]

REWARD = """
def reward_func(queries, prompts, labels, **kwargs):
    return [float(q[len(p):].strip().startswith(l)) for q, p, l in zip(queries, prompts, labels)]
"""


def test_converted_grpo_command_runs_a_step(tmp_path, rl_job, monkeypatch):
    # The prompts come as a hub dataset name from the local hub cache (the layout
    # huggingface_hub writes), as a cluster user who downloaded them on the login node has.
    import pyarrow as pa
    import pyarrow.parquet as pq
    snapshot = tmp_path / "hub" / "datasets--org--math" / "snapshots" / "r1"
    (snapshot / "data").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist([{"question": f"{a}+{b}=", "answer": str(a + b)}
                                         for a in range(4) for b in range(4)]),
                   str(snapshot / "data" / "train-00000-of-00001.parquet"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))   # the job inherits it
    (tmp_path / "reward_func.py").write_text(REWARD)
    monkeypatch.chdir(tmp_path)         # the command names ./reward_func.py
    assert main(["from-openrlhf", "-o", str(tmp_path / "grpo.yaml"), "--", *GRPO]) == 0
    job = rl_job(tmp_path / "run", [
        "model.path=tiny:llama", "model.dtype=float32", "rollout.engine=hf",
        "data.prompts=org/math", f"reward.func_path={tmp_path / 'reward_func.py'}",
        "topology.procs_per_node=1", "rollout.num_engines=1", "rollout.tensor_parallel_size=1",
        "rollout.prompts_per_step=2", "train.batch_size=16", "train.micro_batch_size=4",
        "rollout.max_new_tokens=4", "train.num_steps=1"], config=tmp_path / "grpo.yaml",
        timeout_s=300)
    rows = job.metrics
    assert [r["step"] for r in rows] == [1]
    assert 0.0 <= rows[0]["reward/mean"] <= 1.0 and math.isfinite(rows[0]["loss/policy"])


def test_converted_ppo_command_runs_a_step(tmp_path, rl_job):
    """The PPO command line (actor + critic + reward model, colocated): the 8B hub models become
    tiny:llama (the reward model a tiny value model), prompts a local chat dataset."""
    from openrlhf_commands import PPO
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps({"context_messages": [
        {"role": "user", "content": f"Say {w}."}]}) + "\n" for w in ("hi", "yes", "no", "ok")))
    assert main(["from-openrlhf", "-o", str(tmp_path / "ppo.yaml"), "--", *PPO]) == 0
    job = rl_job(tmp_path / "run", [
        "model.path=tiny:llama", "model.reward_model_path=tiny:llama", "model.dtype=float32",
        "rollout.engine=hf", f"data.prompts={data}", "topology.procs_per_node=1",
        "rollout.num_engines=1", "rollout.tensor_parallel_size=1", "rollout.enable_sleep=false",
        "rollout.prompts_per_step=4", "train.batch_size=4", "train.micro_batch_size=2",
        "rollout.max_new_tokens=4", "train.num_steps=1", "data.max_samples=0",
        "checkpoint.export_hf=false",
        "reward.normalize=false"],  # the tiny stand-in RM has no recorded score mean/std
        config=tmp_path / "ppo.yaml", timeout_s=300)
    rows = job.metrics
    assert [r["step"] for r in rows] == [1]
    assert math.isfinite(rows[0]["loss/policy"]) and math.isfinite(rows[0]["loss/value"])
