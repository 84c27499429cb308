"""OpenRLHF flag names and TRL config names -> our fields, for "did you mean" on unknown keys.

`PEER_NAMES[name] = (field, note)`: `field` is the dotted field that does the same job (or ''
when we have none), `note` says how the value differs when it does. One table serves the
config loader's suggestions and the README's flag table; the names are what users type from
OpenRLHF's command lines (`--actor_learning_rate` -> `actor_learning_rate`) and TRL configs.
"""
from __future__ import annotations

PEER_NAMES: dict[str, tuple[str, str]] = {
    # models
    "pretrain": ("model.path", ""),
    "model_name_or_path": ("model.path", ""),
    "reward_pretrain": ("model.reward_model_path", ""),
    "critic_pretrain": ("model.critic_path", ""),
    "ref_pretrain": ("model.ref_path", ""),
    "teacher_model": ("train.teacher_path", ""),
    "teacher_model_name_or_path": ("train.teacher_path", ""),
    "bf16": ("model.dtype", "model.dtype=bfloat16"),
    "flash_attn": ("model.attn_implementation", "model.attn_implementation=flash_attention_2"),
    "target_modules": ("model.lora_targets", ""),
    "lora_target_modules": ("model.lora_targets", ""),
    "use_peft": ("model.lora_rank", "LoRA is on when model.lora_rank > 0"),
    # data
    "prompt_data": ("data.prompts", ""),
    "dataset": ("data.prompts", "every trainer reads its dataset from data.prompts"),
    "dataset_name": ("data.prompts", "a local file, datasets directory or task:<name>"),
    "train_dataset": ("data.prompts", ""),
    "eval_dataset": ("data.eval_prompts", ""),
    "prompt_max_len": ("data.max_prompt_len", ""),
    "max_prompt_length": ("data.max_prompt_len", ""),
    "max_length": ("data.max_len", ""),
    "packing_samples": ("data.packing", ""),
    "max_samples": ("data.max_samples", ""),
    "normalize_reward": ("reward.normalize", ""),
    "prompt_data_probs": ("data.prompts_probs", ""),
    "dataset_probs": ("data.prompts_probs", ""),
    "pretrain_mode": ("data.pretrain_mode", ""),
    # rollout
    "generate_max_len": ("rollout.max_new_tokens", ""),
    "max_completion_length": ("rollout.max_new_tokens", ""),
    "response_length": ("rollout.max_new_tokens", ""),
    "num_generations": ("rollout.n_samples_per_prompt", ""),
    "rollout_batch_size": ("rollout.prompts_per_step", "prompts per step, before the n samples"),
    "vllm_num_engines": ("rollout.num_engines", ""),
    "vllm_tensor_parallel_size": ("rollout.tensor_parallel_size", ""),
    "vllm_gpu_memory_utilization": ("rollout.gpu_memory_utilization", ""),
    "vllm_enable_sleep": ("rollout.enable_sleep", ""),
    "use_vllm": ("rollout.engine", "rollout.engine=vllm"),
    "async_train": ("rollout.async_steps", "rollout.async_steps=1"),
    # training
    "num_episodes": ("train.num_steps", "we count optimizer steps, not passes over the data"),
    "max_steps": ("train.num_steps", ""),
    "num_train_epochs": ("train.num_steps", "we count steps, not epochs"),
    "max_epochs": ("train.epochs_per_step", "RL: passes over each step's samples"),
    "num_ppo_epochs": ("train.epochs_per_step", ""),
    "train_batch_size": ("train.batch_size", "samples per optimizer step over all ranks"),
    "micro_train_batch_size": ("train.micro_batch_size", ""),
    "per_device_train_batch_size": ("train.micro_batch_size", ""),
    "gradient_accumulation_steps": ("train.batch_size",
                                    "set the global batch; accumulation is derived from it"),
    "learning_rate": ("train.actor_lr", "the policy's (or SFT/DPO/RM model's) learning rate"),
    "actor_learning_rate": ("train.actor_lr", ""),
    "critic_learning_rate": ("train.critic_lr", ""),
    "lr_scheduler_type": ("train.lr_scheduler", ""),
    "warmup_ratio": ("train.lr_warmup_ratio", ""),
    "l2": ("train.weight_decay", ""),
    "adam_betas": ("train.adam_beta1", "train.adam_beta1 and train.adam_beta2"),
    "max_norm": ("train.max_grad_norm", ""),
    "adam_offload": ("train.offload_optimizer", ""),
    "ring_attn_size": ("train.ring_attn_size", ""),
    "ipo": ("train.preference_loss", "train.preference_loss=ipo"),
    "kd_coef": ("train.kd_coef", "same mix; OpenRLHF's default is 0.4, ours 1.0"),
    # algorithm
    "advantage_estimator": ("algorithm.name", ""),
    "init_kl_coef": ("algorithm.kl_coef", ""),
    "kl_coef": ("algorithm.kl_coef", ""),
    "use_kl_loss": ("algorithm.kl_in_reward", "use_kl_loss=true is algorithm.kl_in_reward=false"),
    "use_kl_estimator_k3": ("algorithm.kl_estimator", "algorithm.kl_estimator=k3"),
    "eps_clip": ("algorithm.clip_eps_low", "and algorithm.clip_eps_high"),
    "eps_clip_low_high": ("algorithm.clip_eps_low", "and algorithm.clip_eps_high"),
    "epsilon": ("algorithm.clip_eps_low", ""),
    "epsilon_high": ("algorithm.clip_eps_high", ""),
    "cliprange": ("algorithm.clip_eps_low", "and algorithm.clip_eps_high"),
    "cliprange_value": ("algorithm.value_clip", ""),
    "lambd": ("algorithm.lam", ""),
    "entropy_loss_coef": ("algorithm.entropy_coef", ""),
    "overlong_buffer_len": ("algorithm.overlong_buffer", ""),
    "overlong_penalty_factor": ("algorithm.overlong_penalty", ""),
    "reward_clip_range": ("algorithm.reward_clip", ""),
    "loss_type": ("algorithm.loss_agg", "RL; for DPO-style trainers train.preference_loss"),
    "vllm_is_truncated_threshold": ("algorithm.tis_cap", "[low, high] is algorithm.tis_floor "
                                    "and algorithm.tis_cap"),
    "enable_vllm_is_correction": ("algorithm.off_policy", "algorithm.off_policy=tis"),
    # rewards
    "remote_rm_url": ("reward.remote_url",
                      "a .py file is reward.source=func reward.func_path=FILE"),
    "agent_func_path": ("reward.agent_path", ""),
    "reward_funcs": ("reward.func_path", "one file defining reward_func"),
    # topology and launch
    "colocate_all_models": ("topology.mode", "topology.mode=colocated"),
    "vllm_mode": ("topology.mode", "server = disaggregated, colocate = colocated"),
    "actor_num_nodes": ("topology.nodes", ""),
    "actor_num_gpus_per_node": ("topology.procs_per_node", ""),
    "save_path": ("launch.run_dir", ""),
    "ckpt_path": ("launch.run_dir", "checkpoints live in <run_dir>/checkpoints"),
    "output_dir": ("launch.run_dir", ""),
    # checkpoints, logging, eval
    "save_steps": ("checkpoint.save_every", ""),
    "max_ckpt_num": ("checkpoint.keep_last", ""),
    "load_checkpoint": ("checkpoint.resume", ""),
    "save_hf_ckpt": ("checkpoint.export_hf", ""),
    "logging_steps": ("logging.log_every", ""),
    "use_wandb": ("logging.wandb_project", ""),
    "use_tensorboard": ("logging.tensorboard", ""),
    "report_to": ("logging.tensorboard", "or logging.wandb_project"),
    "eval_steps": ("eval.every", ""),
    "seed": ("train.seed", "and data.seed"),
    "temperature": ("rollout.temperature", ""),
    "top_p": ("rollout.top_p", ""),
    "wandb_project": ("logging.wandb_project", ""),
}


def peer_hint(key: str) -> str:
    """' (did you mean FIELD? NAME is the OpenRLHF/TRL name[: note])' for a peer's name, else
    ''."""
    leaf = key.rsplit(".", 1)[-1].lstrip("-")
    if leaf not in PEER_NAMES:
        return ""
    field, note = PEER_NAMES[leaf]
    if not field:
        return f" ({leaf} is an OpenRLHF/TRL name: {note})"
    return f" (did you mean {field}? {leaf} is the OpenRLHF/TRL name{': ' + note if note else ''})"
