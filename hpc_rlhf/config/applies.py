"""Which trainers read each config field (STYLE rule 11: every field is read by each trainer it
applies to, or refused for it).

`APPLIES` maps every field of the schema to the trainers that read it and, where its effect
depends on another setting (a topology mode, an algorithm, a reward source), that condition.
`unused_fields` turns a field set away from its default where it has no effect into an error
that names the field, its value, where it applies and the fix, so a config never trains
something other than what it says. tests/unit/test_config_fields.py enumerates the schema: a
field added without an entry here fails it, and so does an entry naming a trainer whose code
does not read the field.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable

from hpc_rlhf.config.schema import TRAINERS, JobConfig

ALL = TRAINERS
GENERATING = ("rl", "rejection_sampling", "iterative_dpo")  # trainers that roll out
SUPERVISED = ("sft", "rm", "prm", "dpo", "kto", "kd", "csft")  # trainers on a fixed dataset
WITH_REFERENCE = ("rl", "dpo", "kto", "iterative_dpo")        # a frozen reference policy
WITH_FROZEN = (*WITH_REFERENCE, "kd")                          # any frozen model (teacher too)


@dataclass(frozen=True)
class Use:
    trainers: tuple[str, ...]
    when: Callable[[JobConfig], bool] | None = None  # also needed for the field to act
    when_text: str = ""                               # that condition, as the user sets it


def _mode(mode: str) -> dict:
    return dict(when=lambda c: c.topology.mode == mode, when_text=f"topology.mode={mode}")


def _source(source: str) -> dict:
    return dict(when=lambda c: c.reward.source == source, when_text=f"reward.source={source}")


_PPO = dict(when=lambda c: c.algorithm.name == "ppo", when_text="algorithm.name=ppo")

APPLIES: dict[str, Use] = {
    # model
    "model.path": Use(ALL), "model.dtype": Use(ALL), "model.num_params_b": Use(ALL),
    "model.ref_path": Use(WITH_REFERENCE),
    "model.critic_path": Use(("rl",), **_PPO),
    "model.reward_model_path": Use(GENERATING, **_source("model")),
    "model.gradient_checkpointing": Use(ALL), "model.attn_implementation": Use(ALL),
    "model.lora_rank": Use(ALL), "model.lora_alpha": Use(ALL), "model.lora_dropout": Use(ALL),
    "model.lora_targets": Use(ALL), "model.load_in_4bit": Use(ALL),
    "model.trust_remote_code": Use(ALL),
    # data
    "data.prompts": Use(ALL), "data.input_key": Use(ALL), "data.skip_bad_rows": Use(ALL),
    "data.apply_chat_template": Use(ALL), "data.chat_template": Use(ALL),
    "data.input_template": Use(ALL), "data.max_samples": Use(ALL),
    "data.pretrain_mode": Use(("sft",)),
    "data.prompts_probs": Use(("rl", *SUPERVISED)),
    "data.eval_prompts": Use(("rl", *SUPERVISED)),
    "data.label_key": Use((*GENERATING, "kto", "prm", "csft")),
    "data.output_key": Use(("sft", "kto", "prm", "kd", "csft")),
    "data.chosen_key": Use(("rm", "dpo")), "data.rejected_key": Use(("rm", "dpo")),
    "data.margin_key": Use(("rm",)),
    "data.prm_step_tag": Use(("prm",)), "data.prm_good_token": Use(("prm",)),
    "data.prm_bad_token": Use(("prm",)),
    "data.max_prompt_len": Use(GENERATING), "data.num_task_prompts": Use(GENERATING),
    "data.seed": Use(GENERATING),
    "data.max_len": Use(SUPERVISED),
    "data.packing": Use((*SUPERVISED, "rejection_sampling", "iterative_dpo")),
    # rollout: the generating trainers; the wire settings only between separate ranks
    **{f"rollout.{f.name}": Use(GENERATING) for f in dataclasses.fields(JobConfig().rollout)},
    "rollout.async_steps": Use(("rl",), **_mode("disaggregated")),
    "rollout.weight_sync_bucket_mb": Use(("rl",), **_mode("disaggregated")),
    "rollout.weight_sync_verify": Use(("rl",), **_mode("disaggregated")),
    # train
    **{f"train.{n}": Use(ALL) for n in (
        "trainer", "num_steps", "batch_size", "micro_batch_size", "actor_lr", "weight_decay",
        "adam_beta1", "adam_beta2", "max_grad_norm", "lr_scheduler", "lr_warmup_ratio",
        "zero_stage", "offload_optimizer", "offload_params", "autotp_size", "seed")},
    "train.ref_offload": Use(WITH_FROZEN),
    "train.epochs_per_step": Use(GENERATING),
    "train.critic_lr": Use(("rl",), **_PPO),
    "train.aux_loss_coef": Use(("sft", "dpo", "rl")),
    "train.ring_attn_size": Use(("sft", "dpo", "rm", "kto", "rl")),
    "train.max_tokens_per_micro_batch": Use(("rl",)), "train.shared_prompt": Use(("rl",)),
    "train.beta": Use(("dpo", "kto", "iterative_dpo")),
    "train.preference_loss": Use(("dpo", "iterative_dpo")),
    "train.label_smoothing": Use(("dpo", "iterative_dpo")),
    "train.teacher_path": Use(("kd",)),
    "train.kd_coef": Use(("kd",)),
    "train.kto_desirable_weight": Use(("kto",)), "train.kto_undesirable_weight": Use(("kto",)),
    "train.rs_candidates": Use(("rejection_sampling", "iterative_dpo")),
    # algorithm: the RL trainer; group filtering lives in the colocated loop
    **{f"algorithm.{f.name}": Use(("rl",)) for f in dataclasses.fields(JobConfig().algorithm)},
    "algorithm.dynamic_filtering": Use(("rl",), **_mode("colocated")),
    "algorithm.dynamic_filtering_range": Use(("rl",), **_mode("colocated")),
    # reward
    "reward.source": Use(GENERATING),
    "reward.func_path": Use(GENERATING, **_source("func")),
    "reward.remote_url": Use(GENERATING, **_source("remote")),
    "reward.remote_protocol": Use(GENERATING, **_source("remote")),
    "reward.normalize": Use((*GENERATING, "rm"),
                            when=lambda c: c.train.trainer == "rm" or c.reward.source == "model",
                            when_text="reward.source=model"),
    "reward.remote_timeout_s": Use(GENERATING, **_source("remote")),
    "reward.remote_retries": Use(GENERATING, **_source("remote")),
    "reward.agent_path": Use(("rl",), **_source("agent")),
    "reward.max_turns": Use(("rl",), **_source("agent")),
    # topology
    "topology.nodes": Use(ALL), "topology.procs_per_node": Use(ALL),
    "topology.backend": Use(ALL), "topology.timeout_s": Use(ALL),
    "topology.mode": Use(("rl",)),
    "topology.actor_ranks": Use(("rl",), **_mode("disaggregated")),
    "topology.critic_ranks": Use(("rl",), **_mode("disaggregated")),
    "topology.reward_ranks": Use(("rl",), **_mode("disaggregated")),
    # launch, logging, checkpoint: every trainer (the launcher and hpc_rlhf.runtime)
    **{f"launch.{f.name}": Use(ALL) for f in dataclasses.fields(JobConfig().launch)},
    **{f"logging.{f.name}": Use(ALL) for f in dataclasses.fields(JobConfig().logging)},
    "logging.samples_per_step": Use(("rl",)),
    **{f"checkpoint.{f.name}": Use(ALL) for f in dataclasses.fields(JobConfig().checkpoint)},
    # eval: generation-based evaluation in the colocated RL loop (the others: data.eval_prompts)
    **{f"eval.{f.name}": Use(("rl",), **_mode("colocated"))
       for f in dataclasses.fields(JobConfig().eval)},
}


def schema_fields() -> list[tuple[str, object, object]]:
    """(section.field, default, dataclass field) of every leaf field of JobConfig."""
    out = []
    for sec in dataclasses.fields(JobConfig):
        for f in dataclasses.fields(sec.default_factory()):
            out.append((f"{sec.name}.{f.name}", f.default, f))
    return out


def unused_fields(cfg: JobConfig) -> list[str]:
    """A message for each field set away from its default where `cfg` does not use it."""
    errs, trainer = [], cfg.train.trainer
    for name, default, _ in schema_fields():
        section, field = name.split(".")
        value = getattr(getattr(cfg, section), field)
        if value == default:
            continue
        use = APPLIES[name]
        if trainer not in use.trainers:
            errs.append(f"{name}={value!r} is not used by train.trainer={trainer!r} (it applies "
                        f"to {list(use.trainers)}); remove it from the config")
        elif use.when is not None and not use.when(cfg):
            errs.append(f"{name}={value!r} has no effect without {use.when_text}; remove it or "
                        f"set {use.when_text}")
    return errs
