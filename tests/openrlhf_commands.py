"""Example command lines of OpenRLHF's README (PPO, GRPO with a reward function, SFT, DPO, RM),
typed here from its documented flags; shared by the converter's tests."""

PPO = """python3 -m openrlhf.cli.train_ppo_ray --ref_num_nodes 1 --ref_num_gpus_per_node 8
 --reward_num_nodes 1 --reward_num_gpus_per_node 8 --critic_num_nodes 1
 --critic_num_gpus_per_node 8 --actor_num_nodes 1 --actor_num_gpus_per_node 8
 --vllm_num_engines 4 --vllm_tensor_parallel_size 2 --colocate_all_models
 --vllm_gpu_memory_utilization 0.5 --pretrain OpenRLHF/Llama-3-8b-sft-mixture
 --reward_pretrain OpenRLHF/Llama-3-8b-rm-700k --save_path ./final/llama3-8b-rlhf
 --ckpt_path ./ckpt/llama3-8b-rlhf --save_hf_ckpt --micro_train_batch_size 8
 --train_batch_size 128 --micro_rollout_batch_size 16 --rollout_batch_size 1024
 --n_samples_per_prompt 1 --max_epochs 1 --prompt_max_len 1024 --max_samples 100000
 --generate_max_len 1024 --zero_stage 3 --bf16 --actor_learning_rate 5e-7
 --critic_learning_rate 9e-6 --init_kl_coef 0.01 --prompt_data OpenRLHF/prompt-collection-v0.1
 --input_key context_messages --apply_chat_template --normalize_reward
 --gradient_checkpointing --packing_samples --vllm_sync_backend nccl --enforce_eager
 --vllm_enable_sleep --deepspeed_enable_sleep""".split()
GRPO = """ray job submit --address=http://127.0.0.1:8265 -- python3 -m openrlhf.cli.train_ppo_ray
 --actor_num_nodes 1 --actor_num_gpus_per_node 8 --vllm_num_engines 4
 --vllm_tensor_parallel_size 2 --colocate_all_models --pretrain Qwen/Qwen2.5-7B-Instruct
 --remote_rm_url ./reward_func.py --label_key answer --advantage_estimator group_norm
 --n_samples_per_prompt 8 --rollout_batch_size 128 --train_batch_size 1024
 --micro_train_batch_size 4 --micro_rollout_batch_size 16 --init_kl_coef 1e-3 --use_kl_loss
 --use_kl_estimator_k3 --prompt_data ./math.jsonl --input_key question --apply_chat_template
 --generate_max_len 2048 --prompt_max_len 1024 --zero_stage 3 --bf16
 --actor_learning_rate 5e-7 --gradient_checkpointing --save_path ./ckpt/grpo""".split()
SFT = ["deepspeed", "--module", "openrlhf.cli.train_sft", "--max_len", "4096", "--dataset",
       "Open-Orca/OpenOrca", "--input_key", "question", "--output_key", "response",
       "--input_template", "User: {}\nAssistant: ", "--train_batch_size", "256",
       "--micro_train_batch_size", "2", "--max_samples", "500000", "--pretrain",
       "meta-llama/Meta-Llama-3-8B", "--save_path", "./checkpoint/llama3-8b-sft",
       "--save_steps", "-1", "--logging_steps", "1", "--eval_steps", "-1", "--zero_stage", "2",
       "--max_epochs", "1", "--packing_samples", "--bf16", "--flash_attn", "--learning_rate",
       "5e-6", "--gradient_checkpointing"]
PAIRS = """--save_steps -1 --logging_steps 1 --eval_steps -1 --train_batch_size 256
 --micro_train_batch_size 1 --pretrain OpenRLHF/Llama-3-8b-sft-mixture --bf16 --max_epochs 1
 --max_len 8192 --zero_stage 3 --dataset OpenRLHF/preference_dataset_mixture2_and_safe_pku
 --apply_chat_template --chosen_key chosen --rejected_key rejected --flash_attn
 --packing_samples --gradient_checkpointing""".split()
DPO = ["deepspeed", "--module", "openrlhf.cli.train_dpo", "--save_path", "./ckpt/dpo",
       "--learning_rate", "5e-7", "--beta", "0.1", *PAIRS]
RM = ["deepspeed", "--module", "openrlhf.cli.train_rm", "--save_path", "./ckpt/rm",
      "--learning_rate", "9e-6", *PAIRS]
COMMANDS = {"ppo": PPO, "grpo": GRPO, "sft": SFT, "dpo": DPO, "rm": RM}
