"""Config: YAML + overrides round trip, every rule with a bad value, unknown-key suggestions."""
import dataclasses
import subprocess
import sys

import pytest
import yaml

from hpc_rlhf.config import ConfigError, JobConfig, config_from_dict, load_config, sizes, to_dict
from hpc_rlhf.config.loader import parse_override

pytestmark = pytest.mark.unit


def errors_of(*overrides, data=None):
    from hpc_rlhf.config.loader import merge_overrides
    with pytest.raises(ConfigError) as e:
        config_from_dict(merge_overrides(data or {}, list(overrides)))
    return e.value.errors


def one_error(*overrides, data=None):
    errs = errors_of(*overrides, data=data)
    assert len(errs) == 1, errs
    return errs[0]


def test_defaults_are_valid():
    cfg = load_config()
    assert isinstance(cfg, JobConfig)
    assert cfg.algorithm.name == "grpo"


def test_yaml_and_overrides_round_trip(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"rollout": {"n_samples_per_prompt": 4, "stop": ["\n\n"]},
                                    "train": {"actor_lr": 3e-6, "batch_size": 64},
                                    "launch": {"time": "02:00:00"}}))
    cfg = load_config(path, ["train.actor_lr=1e-5", "rollout.temperature=0.7",
                             "model.lora_targets=[q_proj,v_proj]", "launch.time=01:30:00",
                             "logging.tensorboard=false"])
    assert cfg.rollout.n_samples_per_prompt == 4
    assert cfg.rollout.stop == ("\n\n",)
    assert cfg.train.actor_lr == 1e-5 and cfg.train.batch_size == 64
    assert cfg.rollout.temperature == 0.7
    assert cfg.model.lora_targets == ("q_proj", "v_proj")
    assert cfg.launch.time == "01:30:00"  # YAML alone would read this as a number
    assert cfg.logging.tensorboard is False
    # The dumped config loads back to the same object.
    again = tmp_path / "again.yaml"
    again.write_text(yaml.safe_dump(to_dict(cfg)))
    assert load_config(again) == cfg


def test_config_is_frozen():
    cfg = load_config()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.train.actor_lr = 1.0


def test_int_widens_to_float_but_not_the_reverse():
    assert load_config(None, ["train.actor_lr=1"]).train.actor_lr == 1.0
    assert "expected int" in one_error("rollout.max_new_tokens=1.5")
    assert "expected bool" in one_error("logging.tensorboard=3")


@pytest.mark.parametrize("key,wrong,suggestion", [
    ("rollout.n_samples", 4, "rollout.n_samples_per_prompt"),
    ("rollout.tempreature", 1.0, "rollout.temperature"),
    ("train.lr", 1e-6, "train.actor_lr"),
    ("train.n_samples_per_prompt", 4, "rollout.n_samples_per_prompt"),  # right name, wrong section
    ("algoritm", {}, "algorithm"),
])
def test_unknown_keys_suggest(key, wrong, suggestion):
    err = one_error(f"{key}={wrong}")
    assert err.startswith(f"unknown key {key}") and f"did you mean {suggestion}?" in err


def test_all_errors_are_collected_at_once():
    errs = errors_of("train.zero_stage=5", "rollout.top_p=2", "foo.bar=1", "rollout.temperature=x")
    assert len(errs) == 4, errs


# One bad value per field-level constraint: (override, words the message must contain).
FIELD_CASES = [
    ("model.dtype=float8", "model.dtype='float8' is not one of"),
    ("model.lora_rank=-1", "model.lora_rank=-1 must be >= 0"),
    ("model.lora_dropout=1.0", "model.lora_dropout=1.0 must be < 1.0"),
    ("data.max_prompt_len=0", "data.max_prompt_len=0 must be > 0"),
    ("rollout.engine=sglang", "rollout.engine='sglang' is not one of"),
    ("rollout.n_samples_per_prompt=0", "rollout.n_samples_per_prompt=0 must be > 0"),
    ("rollout.temperature=0", "rollout.temperature=0.0 must be > 0.0"),
    ("rollout.top_p=1.5", "rollout.top_p=1.5 must be <= 1.0"),
    ("rollout.top_k=-2", "rollout.top_k=-2 must be >= -1"),
    ("rollout.gpu_memory_utilization=0", "must be > 0.0"),
    ("train.trainer=ppo", "train.trainer='ppo' is not one of"),
    ("train.zero_stage=4", "train.zero_stage=4 is not one of"),
    ("train.adam_beta2=1.0", "train.adam_beta2=1.0 must be < 1.0"),
    ("train.lr_warmup_ratio=2", "must be <= 1.0"),
    ("algorithm.name=dpo", "algorithm.name='dpo' is not one of"),
    ("algorithm.clip_eps_low=1.5", "algorithm.clip_eps_low=1.5 must be < 1.0"),
    ("algorithm.kl_estimator=k4", "is not one of"),
    ("algorithm.off_policy=is", "is not one of"),
    ("reward.source=web", "reward.source='web' is not one of"),
    ("topology.mode=hybrid", "topology.mode='hybrid' is not one of"),
    ("topology.nodes=0", "topology.nodes=0 must be > 0"),
    ("launch.rdzv_port=29500", "unknown key launch.rdzv_port: removed (it was never used)"),
    ("checkpoint.keep_last=0", "checkpoint.keep_last=0 must be > 0"),
    ("eval.every=-1", "eval.every=-1 must be >= 0"),
]


@pytest.mark.parametrize("override,words", FIELD_CASES)
def test_field_constraints(override, words):
    assert words in one_error(override)


# Cross-field rules: (overrides, words the single error must contain).
RULE_CASES = [
    (["rollout.n_samples_per_prompt=1", "train.batch_size=16"],
     "needs rollout.n_samples_per_prompt >= 2"),
    (["algorithm.name=reinforce", "rollout.n_samples_per_prompt=1", "train.batch_size=16",
      "algorithm.dynamic_filtering=true"], "dynamic_filtering=True compares rewards"),
    (["train.micro_batch_size=3"], "train.batch_size=128 must be a multiple of"),
    (["train.batch_size=96", "train.micro_batch_size=4"], "must divide the samples per RL step"),
    (["topology.procs_per_node=4", "rollout.tensor_parallel_size=3"],
     "rollout.tensor_parallel_size=3 must divide the world size 4"),
    (["topology.procs_per_node=4", "rollout.num_engines=3"], "must equal the world size 4"),
    (["topology.actor_ranks=2"], "only applies to topology.mode=disaggregated"),
    (["topology.mode=disaggregated", "topology.procs_per_node=4", "topology.actor_ranks=2"],
     "disaggregated roles use 3 ranks"),
    (["topology.mode=disaggregated", "topology.procs_per_node=4", "topology.critic_ranks=1"],
     "runs the critic and reward model on the actor ranks"),
    (["topology.mode=disaggregated", "topology.procs_per_node=4", "topology.reward_ranks=1"],
     "runs the critic and reward model on the actor ranks"),
    (["train.trainer=sft", "topology.mode=disaggregated", "topology.procs_per_node=2"],
     "does not generate"),
    (["topology.procs_per_node=2", "train.autotp_size=2", "train.zero_stage=2",
      "train.ring_attn_size=2", "train.trainer=sft"], "must divide the 2 actor ranks"),
    (["topology.procs_per_node=2", "train.ring_attn_size=2", "train.trainer=csft"],
     "not train.trainer='csft'; set train.ring_attn_size=1"),
    (["topology.procs_per_node=2", "train.autotp_size=2"], "works with ZeRO stages 0-2 only"),
    (["train.offload_params=true", "train.zero_stage=2"], "offload_params=True needs"),
    (["rollout.max_model_len=100"], "exceeds rollout.max_model_len=100"),
    (["train.trainer=sft", "train.shared_prompt=true"],
     "train.shared_prompt=true works for train.trainer='rl' without ring attention"),
    (["topology.procs_per_node=2", "train.ring_attn_size=2", "train.shared_prompt=true"],
     "ring_attn_size=2, aux_loss_coef=0.0); set train.shared_prompt=auto"),
    (["model.attn_implementation=flash_attention_2", "train.shared_prompt=true"],
     "model.attn_implementation='flash_attention_2' does not take; set"),
    (["algorithm.token_mean_scope=micro_batch", "train.max_tokens_per_micro_batch=512"],
     "train.max_tokens_per_micro_batch=512 cuts the step by tokens; set token_mean_scope=step"),
    (["train.trainer=sft", "train.max_tokens_per_micro_batch=512"],
     "is implemented for train.trainer='rl', not 'sft'; set it to 0"),
    (["topology.procs_per_node=3", "rollout.prompts_per_step=16", "train.batch_size=48", "train.micro_batch_size=1", "rollout.n_samples_per_prompt=6"], "must be a multiple of the 3 ranks"),
    (["algorithm.dual_clip=1.0"], "algorithm.dual_clip=1.0 must be > 1"),
    (["algorithm.icepop_low=1.5"], "must bracket 1"),
    (["algorithm.tis_cap=0.5"], "algorithm.tis_cap=0.5 must be >= 1"),
    (["rollout.async_steps=1", "topology.mode=disaggregated", "topology.procs_per_node=2",
      "rollout.prompts_per_step=16"], "set algorithm.off_policy=tis"),
    (["rollout.async_steps=1", "algorithm.off_policy=tis"], "set topology.mode=disaggregated"),
    (["rollout.async_steps=2", "algorithm.off_policy=tis", "topology.mode=disaggregated",
      "topology.procs_per_node=2"], "only 0 (synchronous) or 1"),
    (["algorithm.kl_target=6"], "needs a starting algorithm.kl_coef > 0"),
    (["algorithm.overlong_buffer=64"], "must be below rollout.max_new_tokens=64"),
    (["reward.source=func"], "needs reward.func_path"),
    (["reward.source=func", "reward.func_path=/nonexistent.py"], "does not exist"),
    (["reward.source=remote"], "needs reward.remote_url"),
    (["reward.source=model"], "needs model.reward_model_path"),
    (["reward.source=agent", "reward.agent_path=agent"], "must look like file.py:ClassName"),
    (["train.trainer=rm", "reward.normalize=true", "checkpoint.export_hf=false"],
     "checkpoint.export_hf=false writes no export"),
    (["reward.source=agent", "reward.agent_path=/nonexistent.py:A"], "does not exist"),
    (["data.prompts=data.jsonl"], "reward.source='task' scores built-in tasks only"),
    (["model.path=tiny:gpt2"], "is not a tiny model"),
    (["model.path=embedded:llama"], "is not an embedded model"),
    (["model.load_in_4bit=true"], "trains nothing without LoRA"),
    (["launch.time=4 hours"], "is not a SLURM time"),
    (["launch.name=my job"], "may hold letters"),
]


@pytest.mark.parametrize("overrides,words", RULE_CASES)
def test_cross_field_rules(overrides, words):
    assert words in one_error(*overrides)


@pytest.mark.parametrize("trainer", ["rl", "sft", "dpo", "rm", "kto"])
def test_ring_attention_is_a_config_change_for_wired_trainers(trainer):
    """ring_attn_size=2 on 2 ranks validates for every trainer with a ring path (rules.py
    RING_TRAINERS), and the actor's data-parallel size counts rings, not ranks."""
    from hpc_rlhf.config import sizes
    cfg = load_config(None, ["topology.procs_per_node=2", "train.ring_attn_size=2",
                             f"train.trainer={trainer}"])
    assert cfg.train.ring_attn_size == 2 and sizes(cfg).actor_dp == 1


def test_every_field_is_documented():
    import typing
    for sec in dataclasses.fields(JobConfig):
        cls = typing.get_type_hints(JobConfig)[sec.name]
        for f in dataclasses.fields(cls):
            assert f.metadata.get("doc"), f"{sec.name}.{f.name} has no doc"


def test_sizes_disaggregated():
    cfg = load_config(None, ["topology.mode=disaggregated", "topology.nodes=2",
                             "topology.procs_per_node=2", "rollout.num_engines=1",
                             "train.batch_size=48", "train.micro_batch_size=4",
                             "rollout.prompts_per_step=12"])
    s = sizes(cfg)
    assert (s.world, s.rollout_ranks, s.actor_ranks, s.actor_dp) == (4, 1, 3, 3)
    assert s.samples_per_step == 96 and s.grad_accum == 4 and s.optimizer_steps_per_step == 2


QUICK = ["data.max_prompt_len=96", "rollout.max_new_tokens=8", "rollout.n_samples_per_prompt=8",
         "train.micro_batch_size=8", "train.batch_size=32", "rollout.prompts_per_step=4"]


@pytest.mark.parametrize("overrides,shared,budget", [
    # auto: packed groups where their forward is cheaper (rules.shared_prompt: up to R=194 for
    # P=96, n=8), budget = what a full fixed micro-batch may hold: 8 x (96 + 8) tokens, 8 x 8
    # logit positions
    ([], True, (832, 64)),
    (["rollout.max_new_tokens=194"], True, (8 * 290, 8 * 194)),
    (["rollout.max_new_tokens=195"], False, (8 * 291, 8 * 195)),   # n rows are cheaper
    # the packed row's length limit (4096 = 2048 + 8 x 256)
    (["data.max_prompt_len=2048", "rollout.max_new_tokens=257"], False, (8 * 2305, 8 * 257)),
    (["data.max_prompt_len=2048", "rollout.max_new_tokens=256"], True, (8 * 2304, 8 * 256)),
    (["train.micro_batch_size=4", "train.batch_size=32"], False, (4 * 104, 4 * 8)),  # n > micro
    (["rollout.n_samples_per_prompt=1", "rollout.prompts_per_step=32",
      "algorithm.name=reinforce"], False, (832, 64)),
    (["model.attn_implementation=flash_attention_2"], False, (832, 64)),
    (["train.aux_loss_coef=0.01", "model.path=tiny:mixtral"], False, (832, 64)),
    (["algorithm.token_mean_scope=micro_batch"], True, (0, 0)),  # fixed micro-batch means
    (["train.max_tokens_per_micro_batch=0"], True, (0, 0)),
    (["train.max_tokens_per_micro_batch=500"], True, (500, 0)),
    (["train.shared_prompt=false"], False, (832, 64)),
    (["train.shared_prompt=true", "rollout.max_new_tokens=64"], True, (8 * 160, 8 * 64)),
])
def test_rl_speedups_resolve_on_where_exact(overrides, shared, budget):
    """train.shared_prompt=auto and max_tokens_per_micro_batch=-1 (the defaults) as they run:
    config/rules.shared_prompt / token_budget."""
    s = sizes(load_config(None, [*QUICK, *overrides]))
    assert (s.shared_prompt, (s.micro_tokens, s.micro_response_tokens)) == (shared, budget)
    sft = sizes(load_config(None, ["train.trainer=sft"]))  # off outside RL
    assert (sft.shared_prompt, sft.micro_tokens, sft.micro_response_tokens) == (False, 0, 0)


def test_shared_prompt_takes_yaml_booleans(tmp_path):
    path = tmp_path / "c.yaml"
    for written, loaded in (("true", "true"), ("no", "false"), ("auto", "auto")):
        path.write_text(f"train:\n  shared_prompt: {written}\n")
        assert load_config(path).train.shared_prompt == loaded
        assert load_config(None, [f"train.shared_prompt={written}"]).train.shared_prompt == loaded
    with pytest.raises(ConfigError, match="train.shared_prompt='maybe' is not one of"):
        load_config(None, ["train.shared_prompt=maybe"])
    # other string fields keep YAML booleans' text as written (no "true" coercion)
    assert load_config(None, ["launch.name=yes"]).launch.name == "yes"


def test_parse_override_keeps_strings_verbatim():
    assert parse_override("launch.time=04:00:00") == ("launch.time", "04:00:00")
    assert parse_override("rollout.top_k=5") == ("rollout.top_k", 5)
    with pytest.raises(ConfigError, match="section.field=value"):
        parse_override("train.actor_lr")


def test_cli_check_and_show(tmp_path):
    bad = subprocess.run([sys.executable, "-m", "hpc_rlhf.config", "check", "train.zero_stage=9"],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "train.zero_stage=9" in bad.stderr
    good = subprocess.run([sys.executable, "-m", "hpc_rlhf.config", "show", "rollout.top_k=5"],
                          capture_output=True, text=True)
    assert good.returncode == 0 and "top_k: 5" in good.stdout
