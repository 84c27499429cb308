"""An OpenRLHF command line -> the equivalent job config, and what could not be mapped.

    python -m hpc_rlhf.config from-openrlhf [-o job.yaml] -- python3 -m openrlhf.cli.train_ppo_ray \
        --pretrain Qwen/Qwen2.5-7B --advantage_estimator group_norm ...

The trainer comes from the module name (train_ppo_ray / train_ppo -> rl, train_sft, train_dpo,
train_rm, train_kto, train_kd, train_prm); anything before it (ray job submit, deepspeed, env
assignments) is skipped. Each flag maps through `FLAGS` (special cases) or `peers.PEER_NAMES`
(one field, value converted to the field's type). Where OpenRLHF's default differs from ours in
a way that changes the run, the converter writes OpenRLHF's value (chat template off unless
--apply_chat_template, bfloat16 only with --bf16). Flags it cannot map are listed with why.
"""
from __future__ import annotations

import dataclasses
import shlex
import typing
from pathlib import Path

from hpc_rlhf.config.loader import _field_hint
from hpc_rlhf.config.peers import PEER_NAMES
from hpc_rlhf.config.schema import JobConfig

TRAINERS = {"train_ppo_ray": "rl", "train_ppo": "rl", "train_sft": "sft", "train_dpo": "dpo",
            "train_rm": "rm", "train_kto": "kto", "train_kd": "kd", "train_prm": "prm"}
ESTIMATORS = {"gae": "ppo", "reinforce": "reinforce", "reinforce_baseline": "reinforce_baseline",
              "rloo": "rloo", "group_norm": "grpo", "grpo": "grpo", "dr_grpo": "dr_grpo"}
# Flags with no counterpart here, and why (the converter lists them; the job runs without).
UNMAPPED = {
    "micro_rollout_batch_size": "generation batches are sized by the engine here",
    "num_episodes": "we count optimizer steps: set train.num_steps (episodes x prompts / "
                    "rollout_batch_size)",
    "use_wandb": "the key comes from WANDB_API_KEY; set logging.wandb_project",
    "vllm_sync_backend": "weights sync over NCCL on GPUs (gloo on CPU) automatically",
    "enforce_eager": "vLLM graph capture is vLLM's default here",
    "deepspeed_enable_sleep": "colocated mode offloads DeepSpeed state automatically",
    "colocate_actor_ref": "the reference lives with the actor in colocated mode",
    "colocate_critic_reward": "use topology.critic_ranks / topology.reward_ranks",
    "ref_num_nodes": "disaggregated layouts are set by topology.*_ranks",
    "ref_num_gpus_per_node": "disaggregated layouts are set by topology.*_ranks",
    "critic_num_nodes": "set topology.critic_ranks",
    "critic_num_gpus_per_node": "set topology.critic_ranks",
    "reward_num_nodes": "set topology.reward_ranks",
    "reward_num_gpus_per_node": "set topology.reward_ranks",
    "ring_head_stride": "ring attention splits whole heads here",
    "disable_ds_ckpt": "DeepSpeed checkpoints are how runs resume here",
    "use_tensorboard": "tensorboard is logging.tensorboard (on by default), under the run dir",
    "wandb_org": "set WANDB_ENTITY", "wandb_group": "not mapped", "wandb_run_name": "launch.name",
}


@dataclasses.dataclass
class Conversion:
    trainer: str
    values: dict          # dotted field -> value
    unmapped: list        # (flag, value, why)
    notes: list           # things to check before running


def parse_command(argv: list[str]) -> tuple[str, list[tuple[str, list[str]]]]:
    """(module tail like 'train_ppo_ray', [(flag, values), ...]) of an OpenRLHF command line."""
    words = argv if len(argv) != 1 else shlex.split(argv[0])
    words = [w for w in words if w != "\\"]
    start = next((i for i, w in enumerate(words) if "openrlhf.cli." in w), None)
    if start is None:
        raise ValueError("no 'openrlhf.cli.train_*' module in the command line; paste the whole "
                         "command, e.g. -- python3 -m openrlhf.cli.train_sft --pretrain ...")
    module = words[start].rsplit(".", 1)[-1]
    flags, current = [], None
    for w in words[start + 1:]:
        if w.startswith("--"):
            name, eq, value = w[2:].partition("=")
            current = (name, [value] if eq else [])
            flags.append(current)
        elif current is not None:
            current[1].append(w)
    return module, flags


def _typed(dotted: str, values: list[str]):
    kind = _field_hint(dotted)
    if kind is bool:
        return not values or values[0].lower() not in ("false", "0", "no")
    if not values:
        raise ValueError("needs a value")
    if kind is int:
        return int(float(values[0]))
    if kind is float:
        return float(values[0])
    if typing.get_origin(kind) is tuple:
        return list(values)
    return " ".join(values)


# Flags that set fixed values (switches, or values OpenRLHF spells differently).
FIXED = {
    "bf16": {"model.dtype": "bfloat16"},
    "flash_attn": {"model.attn_implementation": "flash_attention_2"},
    "use_kl_loss": {"algorithm.kl_in_reward": False},
    "use_kl_estimator_k3": {"algorithm.kl_estimator": "k3"},
    "colocate_all_models": {"topology.mode": "colocated"},
    "async_train": {"rollout.async_steps": 1, "topology.mode": "disaggregated"},
    "ipo": {"train.preference_loss": "ipo"},
    "load_checkpoint": {"checkpoint.resume": True},
    "enable_vllm_is_correction": {"algorithm.off_policy": "tis"},
    "apply_chat_template": {"data.apply_chat_template": True},
    "save_hf_ckpt": {"checkpoint.export_hf": True},
}


def _special(name: str, v: list[str], out: dict) -> bool:
    """Flags whose value changes shape on the way; True when handled."""
    one = v[0] if v else ""
    if name in FIXED:
        out.update(FIXED[name])
    elif name == "advantage_estimator":
        if one not in ESTIMATORS:
            raise ValueError(f"unknown estimator; known: {sorted(ESTIMATORS)}")
        out["algorithm.name"] = ESTIMATORS[one]
    elif name == "remote_rm_url":
        if one.endswith(".py"):
            out.update({"reward.source": "func", "reward.func_path": one})
        else:
            out.update({"reward.source": "remote", "reward.remote_url": ",".join(v)})
    elif name == "reward_pretrain":
        out.update({"reward.source": "model", "model.reward_model_path": one})
    elif name == "agent_func_path":
        out.update({"reward.source": "agent", "reward.agent_path": one})
    elif name in ("eps_clip", "eps_clip_low_high"):
        low, high = (v + v)[:2] if name == "eps_clip_low_high" else (one, one)
        out.update({"algorithm.clip_eps_low": float(low), "algorithm.clip_eps_high": float(high)})
    elif name == "adam_betas":
        out.update({"train.adam_beta1": float(v[0]), "train.adam_beta2": float(v[1])})
    elif name == "vllm_is_truncated_threshold":
        out.update({"algorithm.off_policy": "tis", "algorithm.tis_floor": float(v[0]),
                    "algorithm.tis_cap": float(v[-1])})
    elif name == "reward_clip_range":
        low, high = float(v[0]), float(v[-1])
        if low != -high:
            raise ValueError("only a symmetric range [-x, x] maps (algorithm.reward_clip=x)")
        out.update({"algorithm.reward_clip": high, "algorithm.reward_clip_stage": "shaped"})
    elif name in ("save_steps", "eval_steps", "logging_steps") and v and int(v[0]) < 0:
        out[PEER_NAMES[name][0]] = 0  # OpenRLHF's -1 = never; ours is 0
    elif name == "placeholder_token":
        out["data.prm_step_tag"] = one
    elif name == "reward_tokens":
        out.update({"data.prm_good_token": v[0], "data.prm_bad_token": v[1]})
    elif name in ("prompt_data_probs", "dataset_probs"):
        out["data.prompts_probs"] = [float(x) for x in ",".join(v).split(",") if x]
    elif name == "dynamic_filtering_reward_range":
        out["algorithm.dynamic_filtering_range"] = [float(v[0]), float(v[1])]
    elif name == "packing_samples" and out["train.trainer"] != "rl":
        out["data.packing"] = True
    else:
        return False
    return True


def convert(argv: list[str]) -> Conversion:
    module, flags = parse_command(argv)
    if module not in TRAINERS:
        raise ValueError(f"openrlhf.cli.{module} has no counterpart; supported: "
                         f"{sorted(TRAINERS)}")
    trainer = TRAINERS[module]
    # OpenRLHF's defaults where ours differ in a way that changes the run:
    out: dict = {"train.trainer": trainer, "data.apply_chat_template": False,
                 "model.dtype": "float32"}
    if trainer == "rl":  # --advantage_estimator gae, --n_samples_per_prompt 1, and rewards
        # clipped to --reward_clip_range (-10, 10) after the group baseline, by default
        out.update({"algorithm.name": "ppo", "rollout.n_samples_per_prompt": 1,
                    "algorithm.reward_clip_stage": "shaped"})
    unmapped, notes = [], []
    for name, v in flags:
        try:
            if _special(name, v, out):
                continue
            if name == "ckpt_path" and "launch.run_dir" in out or name == "packing_samples":
                why = ("checkpoints live in <launch.run_dir>/checkpoints" if name == "ckpt_path"
                       else "RL micro-batches are padded rows grouped by length under a token "
                            "budget (train.max_tokens_per_micro_batch, auto by default)")
                unmapped.append((name, " ".join(v), why))
                continue
            if name in UNMAPPED or (name == "max_epochs" and trainer != "rl"):
                why = UNMAPPED.get(name, "we count optimizer steps: set train.num_steps")
                unmapped.append((name, " ".join(v), why))
                continue
            dotted, why = PEER_NAMES.get(name, (_own_field(name), "no counterpart"))
            if not dotted:
                unmapped.append((name, " ".join(v), why))
                continue
            out[dotted] = _typed(dotted, v)
        except (ValueError, IndexError) as e:
            unmapped.append((name, " ".join(v), f"value not understood: {e}"))
    if out.get("reward.source") == "agent":
        notes.append("an episode ends when the agent says done or after reward.max_turns model "
                     "turns (default 4): raise reward.max_turns if your agent runs longer")
    if out.get("rollout.num_engines") and out.get("topology.mode") != "colocated":
        out["topology.mode"] = "disaggregated"
    for key in ("data.prompts", "data.eval_prompts", "model.path", "model.reward_model_path",
                "model.critic_path", "train.teacher_path"):
        value = str(out.get(key, ""))
        if value.count("/") == 1 and not value.startswith((".", "/", "~", "task:")) \
                and not Path(value).exists():
            notes.append(f"{key}={value!r} looks like a hub id: " + (
                "datasets are read from local files, save_to_disk directories or the local hub "
                "cache: download it there first (huggingface-cli download --repo-type dataset)"
                if key.startswith("data.") else
                "the compute nodes must reach the hub or its local cache"))
    return Conversion(trainer, out, unmapped, notes)


def _own_field(name: str) -> str:
    """'section.name' when `name` is one of our field names (OpenRLHF often uses the same)."""
    hits = [f"{sec.name}.{f.name}" for sec in dataclasses.fields(JobConfig)
            for f in dataclasses.fields(typing.get_type_hints(JobConfig)[sec.name])
            if f.name == name]
    return hits[0] if len(hits) == 1 else ""


def to_nested(values: dict) -> dict:
    nested: dict = {}
    for dotted, value in values.items():
        section, name = dotted.split(".")
        nested.setdefault(section, {})[name] = value
    return nested
