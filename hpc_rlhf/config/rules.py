"""Cross-field rules and the sizes derived from a config (world, roles, batches).

Each rule returns messages naming the fields, their values, the constraint and a fix.
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from pathlib import Path

from hpc_rlhf.config.fields import field_errors
from hpc_rlhf.config.schema import JobConfig

GROUP_ALGORITHMS = ("grpo", "dr_grpo", "rloo", "reinforce_baseline")
GENERATING_TRAINERS = ("rl", "rejection_sampling", "iterative_dpo")
EMBEDDED_MODELS = ("embedded:smollm2-135m",)
TINY_MODELS = ("tiny:llama", "tiny:qwen2", "tiny:mixtral", "tiny:qwen2_moe",
               "tiny:qwen3_moe")
# trainers with a RingAttention path (hpc_rlhf/engine/ring_common.py); the others would train
# without it (and with the wrong grad_accum), so the config refuses ring_attn_size > 1 there
RING_TRAINERS = ("sft", "dpo", "rm", "kto", "rl")
AUX_LOSS_TRAINERS = ("sft", "dpo", "rl")  # trainers that add train.aux_loss_coef x aux_loss
_TIME = re.compile(r"^(\d+-)?\d{1,3}:\d{2}(:\d{2})?$|^\d+$")


@dataclass(frozen=True)
class Sizes:
    """Numbers every later stage (topology, planner, trainer) derives the same way."""
    world: int
    rollout_ranks: int      # ranks that only serve rollouts (0 when colocated)
    num_engines: int        # vLLM engines
    actor_ranks: int
    critic_ranks: int       # separate critic ranks (0: critic shares the actor ranks)
    reward_ranks: int       # separate reward-model ranks
    actor_dp: int           # data-parallel size of the actor (ranks / (autotp * ring))
    samples_per_step: int   # prompts_per_step * n_samples_per_prompt
    grad_accum: int         # micro-batches per optimizer step on one rank
    optimizer_steps_per_step: int
    # RL micro-batching as it runs (train.shared_prompt / max_tokens_per_micro_batch resolved):
    shared_prompt: bool = False     # one packed row per prompt group
    micro_tokens: int = 0           # token budget of a micro-batch (0: fixed micro_batch_size)
    micro_response_tokens: int = 0  # and of its response (logit) positions (0: no cap)


def sizes(cfg: JobConfig) -> Sizes:
    t, r, tr = cfg.topology, cfg.rollout, cfg.train
    world = t.nodes * t.procs_per_node
    uses_rollout = tr.trainer in GENERATING_TRAINERS
    if t.mode == "colocated":
        engines = r.num_engines or max(world // r.tensor_parallel_size, 1)
        rollout_ranks, critic, reward = 0, 0, 0
        actor = world
    else:
        engines = (r.num_engines or 1) if uses_rollout else 0
        rollout_ranks = engines * r.tensor_parallel_size
        critic, reward = t.critic_ranks, t.reward_ranks
        actor = t.actor_ranks or max(world - rollout_ranks - critic - reward, 0)
    actor_dp = max(actor // (tr.autotp_size * tr.ring_attn_size), 1)
    samples = r.prompts_per_step * r.n_samples_per_prompt
    grad_accum = max(tr.batch_size // max(tr.micro_batch_size * actor_dp, 1), 1)
    opt_steps = max(samples // tr.batch_size, 1) * tr.epochs_per_step
    return Sizes(world, rollout_ranks, engines, actor, critic, reward, actor_dp, samples,
                 grad_accum, opt_steps, shared_prompt(cfg), *token_budget(cfg))


SHARED_ROW_MAX = 4096   # auto shared prompts: longest packed row (its [L, L] attention mask)
SHARED_COST_HIDDEN = 512  # ... and the hidden size its cost model assumes (below)


def shared_prompt(cfg: JobConfig) -> bool:
    """train.shared_prompt as it runs. auto: on where it is exact and pays: RL with groups
    (n > 1) that fit one micro-batch (n <= micro_batch_size), no ring attention or MoE aux
    loss, an attention kernel that takes 4-D masks (not flash_attention_2), a packed row of at
    most SHARED_ROW_MAX tokens (P + n R, with P = data.max_prompt_len, R = max_new_tokens; its
    mask and eager attention grow with the square), and a cheaper forward: per layer a row of L
    tokens costs ~24 h^2 L (the matmuls) + 4 h L^2 (attention over the whole masked row), and
    the packed row (L = P + n R) must beat n rows (L = P + R) at h = SHARED_COST_HIDDEN, a
    small model's width (wider models gain more). E.g. n=8: on up to R=158 for P=64, R=326 for
    P=256, R=448 for P=512 (the row limit)."""
    tr, r = cfg.train, cfg.rollout
    if tr.shared_prompt != "auto":
        return tr.shared_prompt == "true"
    P, R, n = cfg.data.max_prompt_len, r.max_new_tokens, r.n_samples_per_prompt
    h = SHARED_COST_HIDDEN

    def cost(length: int, rows: int) -> int:
        return rows * (24 * h * h * length + 4 * h * length * length)

    return (tr.trainer == "rl" and 1 < n <= tr.micro_batch_size and tr.ring_attn_size == 1
            and tr.aux_loss_coef == 0 and cfg.model.attn_implementation != "flash_attention_2"
            and P + n * R <= SHARED_ROW_MAX and cost(P + n * R, 1) < cost(P + R, n))


def token_budget(cfg: JobConfig) -> tuple[int, int]:
    """(tokens, response tokens) per RL micro-batch, 0 = not bounded that way. A set
    train.max_tokens_per_micro_batch bounds the padded tokens. auto (-1): what a full fixed
    micro-batch may hold at the longest lengths, micro_batch_size x (P + R) padded tokens and
    micro_batch_size x R response positions (logits), so a dynamic micro-batch never needs
    more memory than a fixed one; short samples then share a forward instead of each micro-batch
    padding to its longest. auto is off (0, 0) with ring attention (its own split) and with
    algorithm.token_mean_scope=micro_batch (a mean per fixed micro-batch)."""
    tr = cfg.train
    if tr.trainer != "rl" or tr.max_tokens_per_micro_batch == 0:
        return 0, 0
    if tr.max_tokens_per_micro_batch > 0:
        return tr.max_tokens_per_micro_batch, 0
    if tr.ring_attn_size > 1 or cfg.algorithm.token_mean_scope == "micro_batch":
        return 0, 0
    P, R = cfg.data.max_prompt_len, cfg.rollout.max_new_tokens
    return tr.micro_batch_size * (P + R), tr.micro_batch_size * R


def validate(cfg: JobConfig) -> list[str]:
    errors: list[str] = []
    for f in dataclasses.fields(cfg):
        errors.extend(field_errors(getattr(cfg, f.name), f.name))
    if errors:  # cross-field rules assume each field is sane on its own
        return errors
    for rule in (_model_rules, _data_rules, _topology_rules, _batch_rules, _algorithm_rules,
                 _reward_rules, _launch_rules):
        errors.extend(rule(cfg))
    # fields without effect for this trainer / setting, unless a rule above already named them
    from hpc_rlhf.config.applies import unused_fields
    errors.extend(e for e in unused_fields(cfg)
                  if not any(f"{e.split('=')[0]}=" in other for other in errors))
    return errors


def _model_rules(cfg: JobConfig) -> list[str]:
    m, errs = cfg.model, []
    for name in ("path", "ref_path", "critic_path"):
        value = getattr(m, name)
        if value.startswith("tiny:") and value not in TINY_MODELS:
            errs.append(f"model.{name}={value!r} is not a tiny model; use one of {list(TINY_MODELS)}")
        if value.startswith("embedded:") and value not in EMBEDDED_MODELS:
            errs.append(f"model.{name}={value!r} is not an embedded model; "
                        f"use one of {list(EMBEDDED_MODELS)}")
    if m.load_in_4bit and m.lora_rank == 0:
        errs.append("model.load_in_4bit=True trains nothing without LoRA (model.lora_rank=0); "
                    "set model.lora_rank=16 (QLoRA) or model.load_in_4bit=false")
    tr = cfg.train
    if tr.aux_loss_coef > 0 and tr.trainer not in AUX_LOSS_TRAINERS:
        errs.append(f"train.aux_loss_coef={tr.aux_loss_coef} (MoE load-balancing loss) is wired "
                    f"into the {list(AUX_LOSS_TRAINERS)} trainers only, not train.trainer="
                    f"{tr.trainer!r}; set train.aux_loss_coef=0")
    if tr.aux_loss_coef > 0 and tr.ring_attn_size > 1:
        errs.append(f"train.aux_loss_coef={tr.aux_loss_coef} with train.ring_attn_size="
                    f"{tr.ring_attn_size}: the load-balancing loss of a sequence split over a ring "
                    "is not implemented; set train.aux_loss_coef=0 or train.ring_attn_size=1")
    return errs


def _topology_rules(cfg: JobConfig) -> list[str]:
    t, r, tr, errs = cfg.topology, cfg.rollout, cfg.train, []
    s = sizes(cfg)
    tp = r.tensor_parallel_size
    if tr.trainer not in GENERATING_TRAINERS and t.mode == "disaggregated":
        errs.append(f"topology.mode='disaggregated' needs rollout ranks, but train.trainer="
                    f"{tr.trainer!r} does not generate; set topology.mode=colocated")
    if t.mode == "colocated":
        if s.world % tp:
            errs.append(f"rollout.tensor_parallel_size={tp} must divide the world size "
                        f"{s.world} (topology.nodes={t.nodes} x topology.procs_per_node="
                        f"{t.procs_per_node}) in colocated mode; pick a divisor")
        elif r.num_engines and r.num_engines * tp != s.world:
            errs.append(f"rollout.num_engines={r.num_engines} x rollout.tensor_parallel_size={tp}"
                        f" must equal the world size {s.world} in colocated mode; set "
                        f"rollout.num_engines={s.world // tp} or 0 (derive it)")
        for name in ("actor_ranks", "critic_ranks", "reward_ranks"):
            if getattr(t, name):
                errs.append(f"topology.{name}={getattr(t, name)} only applies to "
                            "topology.mode=disaggregated; set it to 0 or change the mode")
    else:
        used = s.rollout_ranks + s.actor_ranks + s.critic_ranks + s.reward_ranks
        if s.actor_ranks == 0 or used != s.world:
            errs.append(
                f"disaggregated roles use {used} ranks (rollout {s.num_engines} engines x TP "
                f"{tp} = {s.rollout_ranks}, actor {s.actor_ranks}, critic {s.critic_ranks}, "
                f"reward {s.reward_ranks}) but the world has {s.world} (topology.nodes="
                f"{t.nodes} x topology.procs_per_node={t.procs_per_node}); make them add up, "
                "e.g. set topology.actor_ranks=0 to give the actor every rank left")
        if tr.trainer == "rl" and (t.critic_ranks or t.reward_ranks):
            errs.append(f"topology.critic_ranks={t.critic_ranks} / reward_ranks={t.reward_ranks}: "
                        "the RL recipe runs the critic and reward model on the actor ranks (or a "
                        "reward server) for now; set both to 0")
        elif t.critic_ranks and cfg.algorithm.name != "ppo":
            errs.append(f"topology.critic_ranks={t.critic_ranks} but algorithm.name="
                        f"{cfg.algorithm.name!r} has no critic; set topology.critic_ranks=0")
        elif t.reward_ranks and cfg.reward.source != "model":
            errs.append(f"topology.reward_ranks={t.reward_ranks} but reward.source="
                        f"{cfg.reward.source!r}; set topology.reward_ranks=0 or reward.source=model")
    per_model = tr.autotp_size * tr.ring_attn_size
    if s.actor_ranks and s.actor_ranks % per_model:
        errs.append(f"train.autotp_size={tr.autotp_size} x train.ring_attn_size="
                    f"{tr.ring_attn_size} = {per_model} must divide the {s.actor_ranks} actor "
                    "ranks; change one of them")
    if tr.ring_attn_size > 1 and tr.trainer not in RING_TRAINERS:
        errs.append(f"train.ring_attn_size={tr.ring_attn_size} (sequence parallelism) is wired "
                    f"into the trainers {list(RING_TRAINERS)}, not train.trainer={tr.trainer!r}; "
                    "set train.ring_attn_size=1")
    if tr.autotp_size > 1 and tr.zero_stage == 3:
        errs.append(f"train.autotp_size={tr.autotp_size} works with ZeRO stages 0-2 only, got "
                    "train.zero_stage=3; set train.zero_stage=2 or train.autotp_size=1")
    if tr.offload_params and tr.zero_stage != 3:
        errs.append(f"train.offload_params=True needs train.zero_stage=3 (got {tr.zero_stage}); "
                    "set train.zero_stage=3 or train.offload_params=false")
    return errs


def _batch_rules(cfg: JobConfig) -> list[str]:
    r, tr, errs = cfg.rollout, cfg.train, []
    s = sizes(cfg)
    t = cfg.topology
    world = f"(topology.nodes={t.nodes} x topology.procs_per_node={t.procs_per_node})"
    per_opt = tr.micro_batch_size * s.actor_dp
    if tr.batch_size % per_opt:
        errs.append(f"train.batch_size={tr.batch_size} must be a multiple of train."
                    f"micro_batch_size={tr.micro_batch_size} x actor data-parallel size "
                    f"{s.actor_dp} {world} = {per_opt}; set train.batch_size="
                    f"{max(tr.batch_size // per_opt, 1) * per_opt}")
    if tr.trainer == "rl" and s.samples_per_step % tr.batch_size:
        errs.append(f"train.batch_size={tr.batch_size} must divide the samples per RL step "
                    f"(rollout.prompts_per_step={r.prompts_per_step} x rollout."
                    f"n_samples_per_prompt={r.n_samples_per_prompt} = {s.samples_per_step}); "
                    f"set train.batch_size to a divisor such as {s.samples_per_step}")
    if (tr.trainer in GENERATING_TRAINERS and cfg.topology.mode == "colocated"
            and r.prompts_per_step % s.world):
        errs.append(f"rollout.prompts_per_step={r.prompts_per_step} must be a multiple of the "
                    f"{s.world} ranks {world} (each rank rolls out whole prompt groups); set it to "
                    f"{max(r.prompts_per_step // s.world, 1) * s.world}")
    if tr.trainer == "rl" and cfg.topology.mode == "disaggregated" and (
            r.prompts_per_step % max(s.actor_dp, 1) or r.prompts_per_step % max(s.num_engines, 1)):
        errs.append(f"rollout.prompts_per_step={r.prompts_per_step} must be a multiple of the "
                    f"actor data-parallel size {s.actor_dp} and of the {s.num_engines} rollout "
                    f"engines {world} (whole prompt groups per rank)")
    if tr.shared_prompt == "true" and (tr.trainer != "rl" or tr.ring_attn_size > 1
                                       or tr.aux_loss_coef > 0):
        errs.append(f"train.shared_prompt=true works for train.trainer='rl' without ring "
                    f"attention or an MoE aux loss (got trainer={tr.trainer!r}, ring_attn_size="
                    f"{tr.ring_attn_size}, aux_loss_coef={tr.aux_loss_coef}); set "
                    "train.shared_prompt=auto (it turns itself off there)")
    elif tr.shared_prompt == "true" and cfg.model.attn_implementation == "flash_attention_2":
        errs.append("train.shared_prompt=true needs 4-D attention masks, which "
                    "model.attn_implementation='flash_attention_2' does not take; set "
                    "model.attn_implementation=sdpa or train.shared_prompt=auto")
    if (tr.max_tokens_per_micro_batch > 0 and tr.trainer == "rl"
            and cfg.algorithm.token_mean_scope == "micro_batch"):
        errs.append(f"algorithm.token_mean_scope='micro_batch' averages fixed micro-batches, but "
                    f"train.max_tokens_per_micro_batch={tr.max_tokens_per_micro_batch} cuts the "
                    "step by tokens; set token_mean_scope=step or max_tokens_per_micro_batch=0")
    if tr.max_tokens_per_micro_batch > 0 and tr.trainer != "rl":
        errs.append(f"train.max_tokens_per_micro_batch={tr.max_tokens_per_micro_batch} (dynamic "
                    f"micro-batches) is implemented for train.trainer='rl', not "
                    f"{tr.trainer!r}; set it to 0 and size micro-batches with "
                    "train.micro_batch_size")
    if r.max_model_len and cfg.data.max_prompt_len + r.max_new_tokens > r.max_model_len:
        errs.append(f"data.max_prompt_len={cfg.data.max_prompt_len} + rollout.max_new_tokens="
                    f"{r.max_new_tokens} exceeds rollout.max_model_len={r.max_model_len}; "
                    "raise max_model_len or set it to 0 (derived)")
    return errs


def _algorithm_rules(cfg: JobConfig) -> list[str]:
    a, r, errs = cfg.algorithm, cfg.rollout, []
    n = r.n_samples_per_prompt
    if a.name in GROUP_ALGORITHMS and n < 2:
        errs.append(f"algorithm.name={a.name!r} uses a per-prompt group baseline and needs "
                    f"rollout.n_samples_per_prompt >= 2 (got {n}); set it to 4-16 or use "
                    "algorithm.name=reinforce")
    rng = a.dynamic_filtering_range if cfg.topology.mode == "colocated" else ()  # else: unused
    if rng and (len(rng) != 2 or not all(isinstance(x, (int, float)) for x in rng)
                or not rng[0] < rng[1]):
        errs.append(f"algorithm.dynamic_filtering_range={list(rng)} must be [low, high] with "
                    "low < high, e.g. [0, 1] (or [] for off)")
    elif rng and not a.dynamic_filtering:
        errs.append(f"algorithm.dynamic_filtering_range={list(rng)} needs "
                    "algorithm.dynamic_filtering=true")
    if a.dynamic_filtering and n < 2:
        errs.append(f"algorithm.dynamic_filtering=True compares rewards within a group and needs "
                    f"rollout.n_samples_per_prompt >= 2 (got {n})")
    if a.dual_clip and a.dual_clip <= 1.0:
        errs.append(f"algorithm.dual_clip={a.dual_clip} must be > 1 (or 0 = off); try 3.0")
    if not a.icepop_low < 1.0 < a.icepop_high:
        errs.append(f"algorithm.icepop_low={a.icepop_low} and algorithm.icepop_high="
                    f"{a.icepop_high} must "
                    "bracket 1 (low < 1 < high); e.g. 0.5 and 5.0")
    if a.tis_cap < 1.0:
        errs.append(f"algorithm.tis_cap={a.tis_cap} must be >= 1 (it truncates ratios from "
                    "above); e.g. 2.0")
    if r.async_steps > 1:
        errs.append(f"rollout.async_steps={r.async_steps}: only 0 (synchronous) or 1 (rollout one "
                    "step ahead) are implemented; set rollout.async_steps=1")
    if r.async_steps and cfg.topology.mode != "disaggregated":
        errs.append(f"rollout.async_steps={r.async_steps} overlaps rollout with training on "
                    "separate ranks; set topology.mode=disaggregated (colocated ranks do one "
                    "thing at a time)")
    if r.async_steps and a.off_policy == "none":
        errs.append(f"rollout.async_steps={r.async_steps} trains on stale rollouts and needs "
                    "off-policy correction; set algorithm.off_policy=tis (or icepop)")
    if a.kl_target and not a.kl_coef:
        errs.append(f"algorithm.kl_target={a.kl_target} (adaptive KL) needs a starting "
                    "algorithm.kl_coef > 0; e.g. algorithm.kl_coef=0.01")
    if a.overlong_buffer >= r.max_new_tokens and a.overlong_buffer:
        errs.append(f"algorithm.overlong_buffer={a.overlong_buffer} must be below rollout."
                    f"max_new_tokens={r.max_new_tokens}; e.g. {r.max_new_tokens // 4}")
    return errs


def input_template_problem(template: str, apply_chat_template: bool) -> str | None:
    """Why data.input_template cannot be used (None when it can): it needs exactly one '{}'
    and the chat template off. Also checked by data.chat.ChatFormat."""
    if not template:
        return None
    if template.count("{}") != 1:
        return (f"data.input_template={template!r} must contain exactly one '{{}}' where the "
                "prompt goes, e.g. 'User: {}\\nAssistant: '")
    if apply_chat_template:
        return (f"data.input_template={template!r} wraps plain-text prompts, but "
                "data.apply_chat_template=true renders them with the chat template; set "
                "data.apply_chat_template=false (or drop data.input_template)")
    return None


def _data_rules(cfg: JobConfig) -> list[str]:
    d = cfg.data
    problem = input_template_problem(d.input_template, d.apply_chat_template)
    errs = [problem] if problem else []
    sources = [p for p in d.prompts.split(",") if p.strip()]
    if d.prompts_probs and (len(d.prompts_probs) != len(sources) or not all(
            isinstance(x, (int, float)) and x > 0 for x in d.prompts_probs)):
        errs.append(f"data.prompts_probs={list(d.prompts_probs)} must hold one positive weight "
                    f"per source of data.prompts ({len(sources)}: {sources})")
    return errs


def _reward_rules(cfg: JobConfig) -> list[str]:
    rw, errs = cfg.reward, []
    if cfg.train.trainer == "rm" and rw.normalize and not cfg.checkpoint.export_hf:
        errs.append("reward.normalize=true records the score mean/std in the exported model's "
                    "config.json, but checkpoint.export_hf=false writes no export; set "
                    "checkpoint.export_hf=true")
    if cfg.train.trainer not in GENERATING_TRAINERS:
        return errs
    if rw.source == "func":
        if not rw.func_path:
            errs.append("reward.source='func' needs reward.func_path=path/to/reward_func.py")
        elif not Path(rw.func_path).is_file():
            errs.append(f"reward.func_path={rw.func_path!r} does not exist; give the path of a "
                        "Python file defining reward_func(queries, prompts, labels)")
    if rw.source == "remote" and not rw.remote_url:
        errs.append("reward.source='remote' needs reward.remote_url=http://host:port/path")
    if rw.source == "model" and not cfg.model.reward_model_path:
        errs.append("reward.source='model' needs model.reward_model_path (a trained RM)")
    agent_file = rw.agent_path.rpartition(":")[0] if ":" in rw.agent_path else rw.agent_path
    if rw.source == "agent" and not agent_file.endswith(".py"):
        errs.append(f"reward.agent_path={rw.agent_path!r} must look like file.py:ClassName (or "
                    "file.py, for OpenRLHF's AgentInstance class) for reward.source='agent'")
    elif rw.source == "agent" and not Path(agent_file).is_file():
        errs.append(f"reward.agent_path={rw.agent_path!r}: {agent_file!r} does not exist; give "
                    "the path of the Python file defining the agent class")
    if rw.source == "task" and not cfg.data.prompts.startswith("task:"):
        errs.append(f"reward.source='task' scores built-in tasks only, but data.prompts="
                    f"{cfg.data.prompts!r}; use reward.source=func/remote/model for a dataset")
    return errs


def _launch_rules(cfg: JobConfig) -> list[str]:
    lc, errs = cfg.launch, []
    if not _TIME.match(lc.time):
        errs.append(f"launch.time={lc.time!r} is not a SLURM time; write HH:MM:SS or "
                    "D-HH:MM:SS, e.g. \"04:00:00\"")
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", lc.name):
        errs.append(f"launch.name={lc.name!r} may hold letters, digits, '_', '.', '-' only")
    for item in lc.env:
        if not isinstance(item, str) or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=[^\n'\"`$\\]*",
                                                         item):
            errs.append(f"launch.env item {item!r} must look like NAME=value (NAME a shell "
                        "variable name; the value without quotes, $, backslashes or newlines), "
                        "e.g. NCCL_SOCKET_IFNAME=ib0")
    for line in lc.setup:
        if not isinstance(line, str) or "\n" in line:
            errs.append(f"launch.setup line {line!r} must be one line of shell (give a list "
                        "with one item per line)")
    return errs
