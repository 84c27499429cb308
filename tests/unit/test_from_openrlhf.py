"""`python -m hpc_rlhf.config from-openrlhf -- <OpenRLHF command line>`: the example command
lines of OpenRLHF's README (PPO, GRPO with a reward function, SFT, DPO, RM; typed here from
its documented flags) become configs that pass `config check`, with each flag where it
belongs and every flag that has no counterpart listed with why."""
import pytest
import yaml

from hpc_rlhf.config import config_from_dict, load_config
from hpc_rlhf.config.__main__ import main
from hpc_rlhf.config.openrlhf import convert, to_nested
from openrlhf_commands import COMMANDS, DPO, GRPO, PPO, SFT

pytestmark = pytest.mark.unit



def _check(values: dict):
    return config_from_dict(to_nested(values))             # raises ConfigError if it fails


@pytest.mark.parametrize("name", COMMANDS)
def test_readme_commands_convert_to_configs_that_pass_check(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)                   # the GRPO command names ./reward_func.py
    (tmp_path / "reward_func.py").write_text("def reward_func(queries, prompts, labels):\n"
                                             "    return [0.0] * len(queries)\n")
    conv = convert(COMMANDS[name])
    cfg = _check(conv.values)                                  # raises ConfigError if not
    assert cfg.train.trainer == {"ppo": "rl", "grpo": "rl"}.get(name, name)
    assert cfg.model.dtype == "bfloat16"                       # --bf16


def test_ppo_mapping():
    conv = convert(PPO)
    v = conv.values
    assert v["algorithm.name"] == "ppo"                        # OpenRLHF's default estimator
    assert v["algorithm.reward_clip_stage"] == "shaped"        # its clip runs after shaping
    assert (v["reward.source"], v["model.reward_model_path"]) == ("model",
                                                                 "OpenRLHF/Llama-3-8b-rm-700k")
    assert (v["train.actor_lr"], v["train.critic_lr"], v["algorithm.kl_coef"]) == (5e-7, 9e-6,
                                                                                    0.01)
    assert (v["rollout.prompts_per_step"], v["rollout.n_samples_per_prompt"]) == (1024, 1)
    assert (v["train.batch_size"], v["train.micro_batch_size"]) == (128, 8)
    assert (v["topology.mode"], v["rollout.num_engines"], v["topology.procs_per_node"]) == (
        "colocated", 4, 8)
    assert v["checkpoint.export_hf"] is True and v["launch.run_dir"] == "./final/llama3-8b-rlhf"
    unmapped = {flag: why for flag, _, why in conv.unmapped}
    assert v["data.max_samples"] == 100000
    assert v["reward.normalize"] is True
    assert {"micro_rollout_batch_size", "ckpt_path",
            "packing_samples", "deepspeed_enable_sleep"} <= set(unmapped)
    assert "generation batches" in unmapped["micro_rollout_batch_size"]
    assert any("data.prompts='OpenRLHF/prompt-collection-v0.1' looks like a hub id" in n
               for n in conv.notes)


def test_grpo_mapping():
    v = convert(GRPO).values
    assert (v["algorithm.name"], v["rollout.n_samples_per_prompt"]) == ("grpo", 8)
    assert (v["reward.source"], v["reward.func_path"]) == ("func", "./reward_func.py")
    assert (v["algorithm.kl_in_reward"], v["algorithm.kl_estimator"]) == (False, "k3")
    assert (v["data.label_key"], v["data.input_key"], v["data.apply_chat_template"]) == (
        "answer", "question", True)
    assert (v["rollout.max_new_tokens"], v["data.max_prompt_len"]) == (2048, 1024)


def test_sft_mapping_keeps_openrlhf_defaults_that_change_the_run():
    conv = convert(SFT)
    v = conv.values
    assert v["data.apply_chat_template"] is False            # OpenRLHF's default: off
    assert v["data.input_template"] == "User: {}\nAssistant: "
    assert (v["checkpoint.save_every"], v["eval.every"]) == (0, 0)  # -1 = never
    assert v["data.packing"] is True and v["model.attn_implementation"] == "flash_attention_2"
    assert v["train.actor_lr"] == 5e-6 and v["data.max_len"] == 4096
    assert "max_epochs" in {flag for flag, _, _ in conv.unmapped}


def test_cli_writes_yaml_and_lists_unmapped(tmp_path, capsys):
    out = tmp_path / "dpo.yaml"
    assert main(["from-openrlhf", "-o", str(out), "--", *DPO]) == 0
    written = yaml.safe_load(out.read_text())
    assert written["train"]["trainer"] == "dpo" and written["train"]["beta"] == 0.1
    err = capsys.readouterr().err
    assert "not mapped: --max_epochs 1: we count optimizer steps" in err
    assert load_config(out).train.preference_loss == "dpo"


def test_cli_refuses_a_command_without_openrlhf_module(capsys):
    assert main(["from-openrlhf", "--", "python", "train.py", "--lr", "1"]) == 2
    assert "no 'openrlhf.cli.train_*' module" in capsys.readouterr().err
