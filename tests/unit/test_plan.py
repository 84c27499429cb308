"""Dry-run planner: memory formulas against the ZeRO paper, parameter counts against a real
model, and the `python -m hpc_rlhf.submit --dry-run` CLI."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from hpc_rlhf.config import load_config
from hpc_rlhf.launch import plan
from hpc_rlhf.topology import build_layout

pytestmark = pytest.mark.unit
REPO = Path(__file__).resolve().parents[2]


# Llama shapes (hidden, layers, intermediate, heads, kv heads, vocab) as their config.json say
LLAMA = {"7b": (4096, 32, 11008, 32, 32, 32000), "13b": (5120, 40, 13824, 40, 40, 32000),
         "70b": (8192, 80, 28672, 64, 8, 128256)}


def llama_dir(tmp_path, size: str) -> str:
    h, layers, inter, heads, kv, vocab = LLAMA[size]
    d = tmp_path / size
    d.mkdir()
    (d / "config.json").write_text(json.dumps({
        "hidden_size": h, "num_hidden_layers": layers, "intermediate_size": inter,
        "num_attention_heads": heads, "num_key_value_heads": kv, "vocab_size": vocab}))
    return str(d)


@pytest.mark.parametrize("stage,expected_gb", [(0, 120.0), (1, 31.4)])
def test_zero_paper_figure_1(stage, expected_gb):
    """ZeRO paper Fig. 1 (DeepSpeed has no estimator for stages 0/1): 7.5B params, Nd=64,
    mixed-precision Adam (K=12)."""
    cfg = load_config(None, [f"train.zero_stage={stage}"])
    shape = plan.ModelShape(int(7.5e9), 4096, 32, 32000)
    b = plan.trained_model_bytes(shape, cfg, dp=64, tp=1, lora=False)
    assert sum(b.values()) / 1e9 == pytest.approx(expected_gb, abs=0.05)


@pytest.mark.parametrize("size", sorted(LLAMA))
@pytest.mark.parametrize("gpus", [8, 64])
@pytest.mark.parametrize("stage,offload", [(3, ()), (3, ("optimizer",)),
                                           (3, ("optimizer", "params")), (2, ()),
                                           (2, ("optimizer",))])
def test_model_states_within_10_percent_of_deepspeeds_estimators(tmp_path, size, gpus, stage,
                                                                 offload):
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs
    shape = plan.model_shape(llama_dir(tmp_path, size))
    cfg = load_config(None, [f"train.zero_stage={stage}", "model.dtype=bfloat16",
                             f"train.offload_optimizer={'optimizer' in offload}",
                             f"train.offload_params={'params' in offload}"])
    ours = sum(plan.trained_model_bytes(shape, cfg, dp=gpus, tp=1, lora=False).values())
    nodes, per_node = gpus // 8, 8
    if stage == 3:
        _, theirs, _ = estimate_zero3_model_states_mem_needs(
            shape.params, shape.largest_layer, per_node, nodes, cpu_offload=bool(offload),
            cpu_offload_params="params" in offload)
    else:
        _, theirs = estimate_zero2_model_states_mem_needs(shape.params, per_node, nodes,
                                                          cpu_offload=bool(offload))
    assert ours == pytest.approx(theirs, rel=0.10), (ours / 2 ** 30, theirs / 2 ** 30)


def test_offload_and_lora_remove_their_terms():
    shape = plan.ModelShape(10**9, 2048, 16, 32000)
    cfg = load_config(None, ["train.offload_optimizer=true", "train.offload_params=true"])
    b = plan.trained_model_bytes(shape, cfg, dp=8, tp=1, lora=False)
    assert b == {"weights": 0, "grads": 0, "adam": 0, "gathered layer": 4 * 32000 * 2048}
    lora = plan.trained_model_bytes(shape, load_config(None, []), dp=8, tp=1, lora=True)
    assert lora["grads"] == 0 and lora["adam"] == 0 and lora["weights"] == 2e9 / 8


def test_activations_shrink_with_checkpointing_and_ring_attention():
    shape = plan.ModelShape(int(7e9), 4096, 32, 32000)
    base = load_config(None, ["train.trainer=sft", "data.max_len=4096",
                              "train.micro_batch_size=1", "model.dtype=bfloat16"])
    full = plan.activation_bytes(shape, base, sp=1)
    assert full["activations"] == 32 * 34 * 4096 * 4096  # Korthikanti et al., flash attention
    assert full["logits"] == 4096 * 32000 * 10
    ckpt = plan.activation_bytes(shape, load_config(None, [
        "train.trainer=sft", "data.max_len=4096", "train.micro_batch_size=1",
        "model.dtype=bfloat16", "model.gradient_checkpointing=true"]), sp=1)
    assert ckpt["activations"] == 32 * 2 * 4096 * 4096 + 34 * 4096 * 4096
    ring = plan.activation_bytes(shape, base, sp=4)
    assert ring["activations"] == full["activations"] / 4


def test_checkpoint_save_time_is_checked_against_the_signal_lead():
    cfg = load_config(REPO / "configs" / "ppo_70b.yaml")
    text, warnings = plan.checkpoint_plan(cfg)
    assert text.startswith("actor+critic: 1,977 GB") and warnings == []
    slow = load_config(REPO / "configs" / "ppo_70b.yaml", ["checkpoint.write_gb_s=1",
                                                           "launch.signal_lead_s=600"])
    text, (warning,) = plan.checkpoint_plan(slow)
    assert "~1,977 s" in text and "raise launch.signal_lead_s to >= 4020" in warning


def test_param_count_matches_a_real_transformers_model(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    for tied in (False, True):
        c = LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied)
        model = LlamaForCausalLM(c)
        d = tmp_path / f"m{tied}"
        d.mkdir()
        (d / "config.json").write_text(json.dumps(c.to_dict()))
        assert plan.count_params(str(d)) == sum(p.numel() for p in model.parameters())


def test_ppo_70b_plan_fits_an_h100_at_18_bytes_per_param():
    cfg = load_config(REPO / "configs" / "ppo_70b.yaml")
    lay = build_layout(cfg)
    mem = {m.world: m for m in plan.memory_plan(cfg, lay, 79.6)}
    shape = plan.model_shape(cfg.model.path, cfg.model.num_params_b)
    actor = dict(mem["actor"].items)
    dp = len(lay.world_members("actor"))
    assert actor["actor weights"] + actor["actor grads"] + actor["actor adam"] == \
        pytest.approx(18 * shape.params / dp)
    assert actor["actor gathered layer"] == 4 * shape.largest_layer
    assert actor["ref weights"] == pytest.approx(2 * shape.params / dp + 2 * shape.largest_layer)
    assert {"activations", "logits", "weight-sync staging (2 buckets)"} <= set(actor)
    assert all(m.total < 79.6 * plan.GIB for m in mem.values())


def _submit(*args, env=None):
    return subprocess.run([sys.executable, "-m", "hpc_rlhf.submit", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, **(env or {})})


def cluster_env(tmp_path) -> dict:
    """What a cluster gives configs/ppo_70b.yaml: its prompt dataset in the hub cache and a
    reward server's URL."""
    snap = tmp_path / "hub" / "datasets--OpenRLHF--prompt-collection-v0.1" / "snapshots" / "a"
    snap.mkdir(parents=True)
    (snap / "train.jsonl").write_text(json.dumps(
        {"context_messages": [{"role": "user", "content": "hi"}]}) + "\n")
    return {"HF_HUB_CACHE": str(tmp_path / "hub"), "REWARD_URL": "http://rm.example:8000/score"}


def test_dry_run_prints_layout_memory_and_commands(tmp_path):
    out = _submit("--config", "configs/ppo_70b.yaml", "--dry-run", env=cluster_env(tmp_path))
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr
    text = out.stdout
    assert "== layout" in text and "== memory per GPU" in text
    assert "   7   7   63  rollout" in text  # node 7, GPU 7, rank 63
    assert "--nnodes 8 --nproc-per-node 8" in text and "#SBATCH --nodes=8" in text
    assert "WARNING" not in text
    small = _submit("--config", "configs/ppo_70b.yaml", "--dry-run", "--gpu-mem-gb", "32",
                    env=cluster_env(tmp_path / "again"))
    assert "WARNING: world actor needs" in small.stdout
    bare = _submit("--config", "configs/ppo_70b.yaml", "--dry-run", env={"REWARD_URL": ""})
    assert bare.returncode == 2 and "== layout" in bare.stdout  # the plan, then the problems
    assert "2 problem(s) in configs/ppo_70b.yaml (nothing queued)" in bare.stdout


def test_invalid_config_exits_2_before_anything():
    out = _submit("--config", "configs/grpo_7b.yaml", "train.batch_size=7", "--dry-run")
    assert out.returncode == 2 and "train.batch_size=7" in out.stderr
    out = _submit("--config", "configs/ppo_70b.yaml", "--local")
    assert out.returncode == 2 and "topology.nodes=8" in out.stderr


def test_failure_summaries_finds_torchrun_blocks_behind_later_lines():
    from hpc_rlhf.launch.submit import failure_summaries
    block = ["=" * 60, "hpc_rlhf.launch.main FAILED", "-" * 60, "Failures:", "  <NO_OTHER_FAILURES>",
             "-" * 60, "Root Cause (first observed failure):", "[0]:",
             "  rank      : 3 (local_rank: 1)", "  traceback : RuntimeError: boom", "=" * 60]
    log = "\n".join(["noise"] * 5 + block + ["Traceback (most recent call last):"] * 80)
    (summary,) = failure_summaries(log)
    assert summary.splitlines() == block
    assert failure_summaries("\n".join(["=" * 10, "not a failure", "=" * 10])) == []
    assert len(failure_summaries(log + "\n" + log)) == 2


def test_plan_says_what_the_rl_batching_defaults_resolve_to():
    from hpc_rlhf.launch.submit import _rl_batching_line
    cfg = load_config("configs/quickstart_grpo.yaml", [])
    P, R, n, m = (cfg.data.max_prompt_len, cfg.rollout.max_new_tokens,
                  cfg.rollout.n_samples_per_prompt, cfg.train.micro_batch_size)
    (line,) = _rl_batching_line(cfg)
    assert f"shared prompts on (train.shared_prompt=auto; a group's packed row: up to {P + n * R} "\
        "tokens)" in line
    assert f"a budget of {m * (P + R)} tokens and {m * R} response positions" in line
    assert "train.max_tokens_per_micro_batch=-1: auto" in line
    off = load_config("configs/quickstart_grpo.yaml",
                      ["train.shared_prompt=false", "train.max_tokens_per_micro_batch=0"])
    (line,) = _rl_batching_line(off)
    assert "shared prompts off" in line and f"fixed micro-batches of {m} samples" in line
    assert _rl_batching_line(load_config("configs/sft_tiny.yaml", [])) == []


def test_dry_run_torchrun_command_is_what_each_nodes_task_runs(tmp_path):
    """The printed line, expanded by a shell as a node's step would, is the argv submitit's
    task runs on that node: is_host included (true on the first node only)."""
    import shutil
    import subprocess
    from types import SimpleNamespace

    from hpc_rlhf.launch.rundir import resolve_run_dir
    from hpc_rlhf.launch.submit import plan_text, torchrun_task
    overrides = ["train.num_steps=3", "launch.max_restarts=2"]
    cfg = load_config(REPO / "configs" / "tiny_disagg.yaml", overrides)
    text, _ = plan_text(cfg, build_layout(cfg), "configs/tiny_disagg.yaml", overrides, None, 80)
    line = text.split("== torchrun command", 1)[1].splitlines()[1]
    task = torchrun_task(cfg, SimpleNamespace(config="configs/tiny_disagg.yaml",
                                              overrides=overrides, program=None),
                         resolve_run_dir(cfg))
    env = {"HEAD_ADDR": "10.0.0.1", "RDZV_PORT": "29500", "SLURM_JOB_ID": "77",
           "PATH": os.environ["PATH"]}
    for node in (0, 1):
        shown = subprocess.run([shutil.which("bash"), "-c", f'printf "%s\\n" {line}'],
                               env={**env, "SLURM_NODEID": str(node)}, capture_output=True,
                               text=True, check=True).stdout.splitlines()
        runs = task.argv(cfg.topology.nodes, "10.0.0.1:29500", "77", is_host=node == 0)
        env_words = shown[:shown.index(runs[0])]  # NAME=value words before the command
        assert env_words == ["TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1"]  # max_restarts=2
        assert shown[len(env_words):] == runs
    assert "--rdzv-conf" in line and "--max-restarts 2" in line
    assert cfg.topology.nodes > 1


def test_dry_run_says_when_the_model_shape_is_guessed_and_how_to_get_the_real_one(
        tmp_path, monkeypatch):
    """ppo_70b names a hub model: without its config.json in the hub cache the plan guesses a
    32k vocabulary (Llama-3 has 128,256) and says so; with it, the real shape and no line."""
    from hpc_rlhf.launch.submit import plan_text
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    cfg = load_config(REPO / "configs" / "ppo_70b.yaml")
    text, _ = plan_text(cfg, build_layout(cfg), "configs/ppo_70b.yaml", [], None, 79.6)
    (line,) = [x for x in text.splitlines() if x.startswith("== model shape guessed")]
    guess = plan.model_shape(cfg.model.path, cfg.model.num_params_b)
    assert guess.vocab == 32000
    assert (f"from model.num_params_b={cfg.model.num_params_b:g}: no config.json for "
            f"model.path={cfg.model.path!r}") in line
    assert f"hidden {guess.hidden}, {guess.layers} layers and a 32,000-token vocabulary" in line
    assert f"huggingface-cli download {cfg.model.path} config.json" in line
    assert "point model.path at a local model directory" in line
    snap = tmp_path / "hub" / f"models--{cfg.model.path.replace('/', '--')}" / "snapshots" / "a"
    snap.mkdir(parents=True)
    (snap / "config.json").write_text((Path(llama_dir(tmp_path, "70b")) / "config.json")
                                      .read_text())
    assert plan.model_shape(cfg.model.path, cfg.model.num_params_b).vocab == 128256
    text, _ = plan_text(cfg, build_layout(cfg), "configs/ppo_70b.yaml", [], None, 79.6)
    assert "== model shape guessed" not in text
    local = load_config(REPO / "configs" / "ppo_70b.yaml", [f"model.path={tmp_path / 'x'}"])
    (line,) = plan.guessed_shape_line(local)
    assert line.endswith("for the real shape, point model.path at a local model directory "
                         "(with its config.json)")


@pytest.mark.parametrize("offload_params", [False, True])
def test_host_ram_for_offloaded_states_within_10_percent_of_deepspeeds_estimator(
        tmp_path, offload_params):
    """Llama-70B, ZeRO-3 with Adam on the CPU, 4 nodes x 8 GPUs: per node, DeepSpeed's host
    estimate (estimate_zero3_model_states_mem_needs_all_cold prints it) and the dry run's line."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

    from hpc_rlhf.launch.submit import plan_text
    cfg = load_config(None, ["train.trainer=sft", f"model.path={llama_dir(tmp_path, '70b')}",
                             "topology.nodes=4", "topology.procs_per_node=8",
                             "train.zero_stage=3", "model.dtype=bfloat16",
                             "train.offload_optimizer=true",
                             f"train.offload_params={offload_params}"])
    layout = build_layout(cfg)
    host = plan.host_memory_plan(cfg, layout)
    shape = plan.model_shape(cfg.model.path)
    theirs, _, _ = estimate_zero3_model_states_mem_needs(
        shape.params, shape.largest_layer, num_gpus_per_node=8, num_nodes=4, cpu_offload=True,
        cpu_offload_params=offload_params)
    assert sorted(host) == [0, 1, 2, 3]
    for node in host:
        assert host[node]["actor"] == pytest.approx(theirs, rel=0.10), (node, host, theirs)
    text, _ = plan_text(cfg, layout, None, [], None, 79.6)
    (line,) = [x for x in text.splitlines() if x.startswith("== host RAM")]
    assert line.startswith(f"== host RAM for CPU-offloaded states, nodes 0-3: "
                           f"{host[0]['actor'] / plan.GIB:,.0f} GiB per node")
    on_gpu = load_config(None, ["train.trainer=sft", f"model.path={tmp_path / '70b'}",
                                "topology.nodes=4", "topology.procs_per_node=8"])
    assert plan.host_memory_plan(on_gpu, build_layout(on_gpu)) == {}


def test_reward_server_gpus_are_counted_and_a_zero_gpu_memory_is_refused(tmp_path):
    out = _submit("--config", "configs/ppo_70b.yaml", "--dry-run", "--gpu-mem-gb", "140.4",
                  env=cluster_env(tmp_path))
    line = next(x for x in out.stdout.splitlines() if x.startswith("== reward server"))
    # 70.6 B params x 2 bytes = 132 GiB: one 140.4 GiB GPU cannot hold it at 90%, two can
    assert "holds 132 GiB of bf16 weights" in line and "at least 2 GPU(s) of 140.4 GiB" in line
    bad = _submit("--config", "configs/ppo_70b.yaml", "--dry-run", "--gpu-mem-gb", "0")
    assert bad.returncode == 2 and "--gpu-mem-gb: '0': give the usable GiB" in bad.stderr
