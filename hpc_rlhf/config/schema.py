"""The job configuration: one frozen dataclass per component, each field with a default, a
one-line doc and a constraint (see fields.opt). Cross-field rules live in rules.py.

Batch vocabulary (as in OpenRLHF): one RL *step* rolls out `rollout.prompts_per_step` prompts x
`rollout.n_samples_per_prompt` samples, then trains on them in optimizer steps of
`train.batch_size` samples, each made of micro-batches of `train.micro_batch_size` samples per
data-parallel rank.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from hpc_rlhf.config.fields import opt

DTYPES = ("float32", "bfloat16", "float16")
ALGORITHMS = ("ppo", "reinforce", "reinforce_baseline", "grpo", "dr_grpo", "rloo")
TRAINERS = ("rl", "sft", "rm", "prm", "dpo", "kto", "kd", "rejection_sampling", "csft",
            "iterative_dpo")


@dataclass(frozen=True)
class ModelConfig:
    path: str = opt("embedded:smollm2-135m", "actor/policy model: an HF directory or hub name, "
                    "'embedded:smollm2-135m' (shipped in a PyPI package) or 'tiny:llama'/'tiny:qwen2'")
    dtype: str = opt("bfloat16", "parameter dtype for training and rollout", choices=DTYPES)
    ref_path: str = opt("", "reference model for the KL term ('' = same as path)")
    critic_path: str = opt("", "critic initialisation for PPO ('' = same as path)")
    reward_model_path: str = opt("", "reward model directory for reward.source=model")
    num_params_b: float = opt(0.0, "parameters in billions for the memory plan "
                              "(0 = read config.json at path)", ge=0.0)
    gradient_checkpointing: bool = opt(False, "recompute activations in backward to save memory")
    attn_implementation: str = opt(
        "auto", "HF attention kernel of the trained models; auto: sdpa on GPU, eager on CPU "
        "(its backward is ~20% faster per train step there than sdpa's)",
        choices=("auto", "eager", "sdpa", "flash_attention_2"))
    lora_rank: int = opt(0, "LoRA rank (0 = full fine-tuning)", ge=0)
    lora_alpha: int = opt(16, "LoRA alpha", gt=0)
    lora_dropout: float = opt(0.0, "LoRA dropout", ge=0.0, lt=1.0)
    lora_targets: tuple = opt(("q_proj", "k_proj", "v_proj", "o_proj"), "module names LoRA wraps")
    load_in_4bit: bool = opt(False, "QLoRA: 4-bit base weights (CUDA + bitsandbytes only)")
    trust_remote_code: bool = opt(False, "allow model code from the model directory")


@dataclass(frozen=True)
class DataConfig:
    prompts: str = opt("task:arithmetic", "prompt source: 'task:<name>' (built-in verifiable "
                       "task) or a .jsonl/.parquet file / dataset directory")
    eval_prompts: str = opt("", "held-out prompt source ('' = a split of the task)")
    input_key: str = opt("prompt", "dataset field holding the prompt (or chat messages)")
    label_key: str = opt("label", "dataset field holding the reference answer")
    output_key: str = opt("response", "dataset field holding the target response (SFT)")
    chosen_key: str = opt("chosen", "dataset field of the preferred response (DPO/RM)")
    rejected_key: str = opt("rejected", "dataset field of the rejected response (DPO/RM)")
    apply_chat_template: bool = opt(True, "wrap prompts with the tokenizer's chat template")
    chat_template: str = opt("", "a jinja chat template to use instead of the tokenizer's own: "
                                  "the template text, or the path of a file holding it")
    input_template: str = opt("", "plain-text prompt wrapper with one {} for the prompt "
                              "(OpenRLHF's --input_template), e.g. 'User: {}\\nAssistant: '; "
                              "needs data.apply_chat_template=false")
    margin_key: str = opt("margin", "dataset field of a pair's reward margin (RM, optional)")
    prm_step_tag: str = opt("\n", "PRM: placeholder text after each step, where labels are "
                            "predicted")
    prm_good_token: str = opt("+", "PRM: the token that means 'good step'")
    prm_bad_token: str = opt("-", "PRM: the token that means 'bad step'")
    pretrain_mode: bool = opt(False, "sft: train on every token of the raw text in "
                              "data.input_key (no response, no chat template; OpenRLHF's "
                              "--pretrain_mode)")
    prompts_probs: tuple = opt((), "mixture weights when data.prompts names several sources "
                               "(comma-separated); [] = equal (OpenRLHF's --prompt_data_probs "
                               "/ --dataset_probs)")
    max_samples: int = opt(0, "train on the first N usable samples (prompts for RL) of "
                           "data.prompts; 0 = all (OpenRLHF's --max_samples)", ge=0)
    max_prompt_len: int = opt(256, "prompts longer than this (tokens) are dropped and counted", gt=0)
    max_len: int = opt(1024, "max total tokens of a training sample (SFT/DPO)", gt=0)
    packing: bool = opt(False, "pack several samples per sequence (no cross-sample attention)")
    num_task_prompts: int = opt(4096, "prompts generated for a built-in task", gt=0)
    skip_bad_rows: bool = opt(False, "skip and count malformed rows instead of failing")
    seed: int = opt(0, "shuffle seed")


@dataclass(frozen=True)
class RolloutConfig:
    engine: str = opt("vllm", "generation backend", choices=("vllm", "hf"))
    prompts_per_step: int = opt(16, "prompts rolled out per RL step", gt=0)
    n_samples_per_prompt: int = opt(8, "samples per prompt (the group for group baselines)", gt=0)
    max_new_tokens: int = opt(64, "max response tokens per turn", gt=0)
    temperature: float = opt(1.0, "sampling temperature", gt=0.0)
    top_p: float = opt(1.0, "nucleus sampling", gt=0.0, le=1.0)
    top_k: int = opt(-1, "top-k sampling (-1 = off)", ge=-1)
    stop: tuple = opt((), "extra stop strings")
    num_engines: int = opt(0, "vLLM engines (0 = derive: colocated world/TP, disaggregated 1)", ge=0)
    tensor_parallel_size: int = opt(1, "GPUs (ranks) per vLLM engine", gt=0)
    gpu_memory_utilization: float = opt(0.5, "vLLM's share of GPU memory", gt=0.0, le=1.0)
    max_model_len: int = opt(0, "vLLM context length (0 = prompt + response budget)", ge=0)
    enable_sleep: bool = opt(True, "colocated: vLLM sleeps during training (CUDA only)")
    async_steps: int = opt(0, "async mode: rollout may run this many steps ahead (0 = sync)", ge=0)
    weight_sync_bucket_mb: int = opt(256, "bucket size for weight sync broadcasts (MB)", gt=0)
    weight_sync_verify: bool = opt(False, "checksum every weight-sync bucket (debug)")


@dataclass(frozen=True)
class TrainConfig:
    trainer: str = opt("rl", "what to train", choices=TRAINERS)
    num_steps: int = opt(20, "RL steps (rl) or optimizer steps (other trainers)", gt=0)
    batch_size: int = opt(128, "samples per optimizer step, all ranks together", gt=0)
    micro_batch_size: int = opt(4, "samples per forward/backward on one rank", gt=0)
    epochs_per_step: int = opt(1, "passes over each RL step's samples (PPO epochs)", gt=0)
    actor_lr: float = opt(1e-6, "actor/policy learning rate", gt=0.0)
    critic_lr: float = opt(9e-6, "critic learning rate (PPO)", gt=0.0)
    weight_decay: float = opt(0.0, "AdamW weight decay", ge=0.0)
    adam_beta1: float = opt(0.9, "AdamW beta1", ge=0.0, lt=1.0)
    adam_beta2: float = opt(0.95, "AdamW beta2", ge=0.0, lt=1.0)
    max_grad_norm: float = opt(1.0, "gradient clipping (0 = off)", ge=0.0)
    aux_loss_coef: float = opt(0.0, "MoE router load-balancing (auxiliary) loss coefficient: "
                               "loss += coef x aux_loss (0 = off; MoE models such as Mixtral / "
                               "Qwen-MoE only; sft, dpo and rl trainers)", ge=0.0)
    lr_scheduler: str = opt("constant", "learning-rate schedule",
                            choices=("constant", "cosine", "linear"))
    lr_warmup_ratio: float = opt(0.0, "fraction of steps spent warming up", ge=0.0, le=1.0)
    zero_stage: int = opt(3, "DeepSpeed ZeRO stage", choices=(0, 1, 2, 3))
    offload_optimizer: bool = opt(False, "ZeRO optimizer states on CPU")
    offload_params: bool = opt(False, "ZeRO-3 parameters on CPU")
    ref_offload: bool = opt(False, "reference model parameters on CPU")
    autotp_size: int = opt(1, "DeepSpeed AutoTP tensor-parallel size", gt=0)
    ring_attn_size: int = opt(1, "sequence-parallel ring size for long context", gt=0)
    max_tokens_per_micro_batch: int = opt(
        -1, "RL: dynamic micro-batches of similar lengths, padded size (rows x longest) at "
            "most this many tokens, each loss weighted by its share of the step (-1 = auto: "
            "micro_batch_size x (data.max_prompt_len + rollout.max_new_tokens) tokens and "
            "micro_batch_size x max_new_tokens logit positions, never more memory than a fixed "
            "micro-batch; 0 = off: micro_batch_size samples each)", ge=-1)
    shared_prompt: str = opt(
        "auto", "RL: run each prompt once per group of samples (one packed row: prompt + all "
                "its responses, a 4-D attention mask); same logprobs and gradients, ~P x (n-1) "
                "fewer tokens per group. auto: on where that is also cheaper (config/rules.py: "
                "packed rows <= 4096 tokens, answers not much longer than prompts, n <= "
                "micro_batch_size, no ring attention, MoE aux loss or flash_attention_2)",
        choices=("auto", "true", "false"))
    seed: int = opt(42, "global seed")
    # Preference / distillation trainers.
    beta: float = opt(0.1, "DPO/IPO/KTO beta", gt=0.0)
    preference_loss: str = opt("dpo", "preference loss", choices=("dpo", "ipo", "cdpo"))
    label_smoothing: float = opt(0.0, "cDPO label smoothing", ge=0.0, lt=0.5)
    teacher_path: str = opt("", "knowledge-distillation teacher model")
    kd_coef: float = opt(1.0, "kd: loss = kd_coef * KL(teacher||student) + (1 - kd_coef) * "
                         "NLL of the response; 1 = pure distillation (OpenRLHF's default: 0.4)",
                         ge=0.0, le=1.0)
    kto_desirable_weight: float = opt(1.0, "KTO weight of desirable samples", gt=0.0)
    kto_undesirable_weight: float = opt(1.0, "KTO weight of undesirable samples", gt=0.0)
    rs_candidates: int = opt(4, "rejection sampling / iterative DPO: candidates per "
                                     "prompt", gt=1)


@dataclass(frozen=True)
class AlgorithmConfig:
    name: str = opt("grpo", "advantage estimator / RL algorithm", choices=ALGORITHMS)
    gamma: float = opt(1.0, "discount (GAE / REINFORCE returns)", ge=0.0, le=1.0)
    lam: float = opt(0.95, "GAE lambda", ge=0.0, le=1.0)
    clip_eps_low: float = opt(0.2, "PPO ratio clip below 1", gt=0.0, lt=1.0)
    clip_eps_high: float = opt(0.2, "PPO ratio clip above 1 (0.28 = DAPO clip-higher)", gt=0.0)
    dual_clip: float = opt(0.0, "dual-clip bound c > 1 for negative advantages (0 = off)", ge=0.0)
    value_clip: float = opt(0.5, "PPO value-loss clip", gt=0.0)
    loss_agg: str = opt("token_mean", "how token losses become one number",
                        choices=("token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"))
    token_mean_scope: str = opt("step", "token_mean over all tokens of the optimizer step "
                                "(step: OpenRLHF's and TRL dapo's convention; the gradient does "
                                "not depend on how the step is cut into micro-batches), or over "
                                "each micro-batch, then averaged (micro_batch: needs fixed "
                                "micro-batches, train.max_tokens_per_micro_batch=0)",
                                choices=("step", "micro_batch"))
    importance_level: str = opt("token", "PPO ratio per token or per sequence (GSPO)",
                                choices=("token", "sequence"))
    kl_coef: float = opt(0.0, "KL(policy || reference) coefficient (initial, if adaptive)", ge=0.0)
    kl_estimator: str = opt("k3", "KL estimator", choices=("k1", "k2", "k3"))
    kl_in_reward: bool = opt(False, "subtract the KL from the reward instead of adding a loss")
    kl_target: float = opt(0.0, "adaptive KL target (0 = fixed coefficient)", ge=0.0)
    kl_horizon: int = opt(10000, "adaptive KL horizon (samples)", gt=0)
    entropy_coef: float = opt(0.0, "entropy bonus coefficient", ge=0.0)
    off_policy: str = opt("none", "correction for rollout/trainer mismatch",
                          choices=("none", "tis", "icepop"))
    tis_cap: float = opt(2.0, "TIS: importance weights truncated at this value", gt=0.0)
    tis_floor: float = opt(0.0, "TIS: importance weights raised to at least this value (0 = no "
                           "lower clamp; OpenRLHF clamps to [0.5, 5]: tis_floor=0.5 "
                           "tis_cap=5)", ge=0.0, le=1.0)
    icepop_low: float = opt(0.5, "ICEPOP: tokens with ratio below this are masked", gt=0.0)
    icepop_high: float = opt(5.0, "ICEPOP: tokens with ratio above this are masked", gt=0.0)
    dynamic_filtering: bool = opt(False, "drop groups whose rewards are all equal (DAPO)")
    dynamic_filtering_range: tuple = opt((), "[low, high]: also drop groups whose mean score is "
                                         "not strictly inside (OpenRLHF's "
                                         "--dynamic_filtering_reward_range); [] = off")
    overlong_buffer: int = opt(0, "DAPO soft overlong penalty window in tokens (0 = off)", ge=0)
    overlong_penalty: float = opt(1.0, "DAPO overlong penalty at the max length", ge=0.0)
    reward_clip: float = opt(10.0, "rewards are clipped to [-x, x]", gt=0.0)
    reward_clip_stage: str = opt("reward", "clip the reward as scored (reward) or after the "
                                 "group baseline (shaped: OpenRLHF's order)",
                                 choices=("reward", "shaped"))


@dataclass(frozen=True)
class RewardConfig:
    source: str = opt("task", "where rewards come from",
                      choices=("task", "func", "remote", "model", "agent"))
    func_path: str = opt("", "reward.source=func: a Python file defining reward_func(...)")
    remote_url: str = opt("", "reward.source=remote: HTTP endpoint; several comma-separated "
                          "URLs share each batch (may use ${ENV_VAR})")
    remote_protocol: str = opt("openrlhf", "request format: openrlhf = {query, prompts, "
                               "labels} as OpenRLHF sends (query = prompt + response); hpc_rlhf"
                               " = {queries, responses, labels}; see rewards/remote.py",
                               choices=("openrlhf", "hpc_rlhf"))
    normalize: bool = opt(False, "reward model scores as (r - mean) / std: train.trainer=rm "
                          "records mean/std of its held-out scores in the export's config.json;"
                          " reward.source=model applies them (OpenRLHF's --normalize_reward, "
                          "same config keys)")
    remote_timeout_s: float = opt(30.0, "remote reward request timeout", gt=0.0)
    remote_retries: int = opt(3, "remote reward retries with backoff", ge=0)
    agent_path: str = opt("", "reward.source=agent: 'file.py:ClassName' multi-turn agent")
    max_turns: int = opt(4, "multi-turn agent: max turns per episode", gt=0)


@dataclass(frozen=True)
class TopologyConfig:
    mode: str = opt("colocated", "colocated: every rank trains and serves; disaggregated: "
                    "separate rollout ranks", choices=("colocated", "disaggregated"))
    nodes: int = opt(1, "nodes in the job", gt=0)
    procs_per_node: int = opt(1, "ranks per node (GPUs per node; processes on CPU)", gt=0)
    actor_ranks: int = opt(0, "disaggregated: actor trainer ranks (0 = all non-rollout ranks "
                           "left after critic/reward ranks)", ge=0)
    critic_ranks: int = opt(0, "disaggregated PPO: critic ranks (0 = on the actor ranks)", ge=0)
    reward_ranks: int = opt(0, "disaggregated: reward-model ranks (0 = on the actor ranks)", ge=0)
    backend: str = opt("auto", "collective backend (auto: nccl on CUDA, else gloo)",
                       choices=("auto", "nccl", "gloo"))
    timeout_s: int = opt(600, "collective timeout: a stuck rank fails the job after this", gt=0)


@dataclass(frozen=True)
class LaunchConfig:
    name: str = opt("hpc_rlhf", "job name (also the run directory's name)")
    run_dir: str = opt("runs/{name}", "where config, layout, logs and checkpoints go")
    partition: str = opt("", "SLURM partition ('' = cluster default)")
    account: str = opt("", "SLURM account ('' = your default)")
    qos: str = opt("", "SLURM QoS")
    time: str = opt("04:00:00", "SLURM time limit HH:MM:SS or D-HH:MM:SS")
    cpus_per_node: int = opt(0, "CPUs per node to request (0: none asked; the node's torchrun "
                             "gets every CPU the job holds there)", ge=0)
    mem: str = opt("0", "memory per node ('0' = all of it)")
    signal_lead_s: int = opt(300, "SLURM sends USR1 this long before the time limit", gt=0)
    requeue: bool = opt(True, "on preemption / time limit: checkpoint, requeue and resume "
                        "(false: checkpoint and end the job)")
    setup: tuple = opt((), "shell lines run on every node before torchrun, in both submit "
                       "paths (module load, source venv/bin/activate, a container wrapper's "
                       "set-up, ...)")
    env: tuple = opt((), "NAME=value pairs exported on every node before torchrun, in both "
                     "submit paths, e.g. [NCCL_SOCKET_IFNAME=ib0, GLOO_SOCKET_IFNAME=ib0, "
                     "NCCL_IB_HCA=mlx5]")
    max_restarts: int = opt(0, "torchrun restarts every rank this many times after a failure "
                            "(they resume from the newest checkpoint); 0 = a failure ends the "
                            "job", ge=0)


@dataclass(frozen=True)
class LoggingConfig:
    tensorboard: bool = opt(True, "write tensorboard event files to the run directory")
    wandb_project: str = opt("", "wandb project ('' = off; needs wandb installed); a resumed run "
                                   "rewinds the same wandb run to its checkpoint")
    log_every: int = opt(0, "print a line of metrics every N steps (0 = none: the progress bar; "
                         "metrics.jsonl and tensorboard get every step)", ge=0)
    progress_bar: bool = opt(True, "show a progress bar on rank 0")
    samples_per_step: int = opt(0, "RL: append this many of rank 0's samples per step (query, "
                                "response, reward as scored) to samples.jsonl (0 = none)", ge=0)
    verbose: bool = opt(False, "--local runs: show the libraries' output (vLLM, DeepSpeed, "
                        "transformers, torch) on the console too; it always goes to "
                        "logs/console.log")


@dataclass(frozen=True)
class CheckpointConfig:
    save_every: int = opt(0, "save every N steps (0 = only at the end and on signals)", ge=0)
    keep_last: int = opt(2, "complete checkpoints kept", gt=0)
    resume: bool = opt(True, "resume from the newest complete checkpoint in the run directory")
    resume_from: str = opt("", "start a new run from this checkpoint (a checkpoints/step_N "
                                "directory, or a run directory: its newest) when the run "
                                "directory has none of its own; weights, optimizer and step")
    export_hf: bool = opt(True, "export the final policy as an HF directory")
    write_gb_s: float = opt(2.0, "write bandwidth to the run directory in GB/s (all nodes "
                            "together): the dry run's checkpoint save-time estimate, checked "
                            "against launch.signal_lead_s", gt=0.0)


@dataclass(frozen=True)
class EvalConfig:
    every: int = opt(0, "evaluate on held-out prompts every N steps (0 = off)", ge=0)
    num_prompts: int = opt(64, "held-out prompts per evaluation", gt=0)
    temperature: float = opt(0.0, "eval sampling temperature (0 = greedy)", ge=0.0)


@dataclass(frozen=True)
class JobConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    topology: TopologyConfig = field(default_factory=TopologyConfig)
    launch: LaunchConfig = field(default_factory=LaunchConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
