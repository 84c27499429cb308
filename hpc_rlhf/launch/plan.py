"""The dry-run plan: layout per node/GPU, memory per rank, checkpoint size and save time, the
exact commands.

Memory model (per GPU, bytes; P = parameters of one model, N = its ZeRO data-parallel size
(every rank of its world but the AutoTP dimension), L = its largest tensor (the embedding or
LM head), tp = AutoTP size; bf16 mixed precision with fp32 Adam):

    model states, as DeepSpeed's own estimators count them
    (estimate_zero2/zero3_model_states_mem_needs; tests/unit/test_plan.py holds us to them):
      ZeRO-3   2P/N weights + 4P/N grads + 12P/N Adam = 18P/N, plus 4L for the layer being
               gathered; offload_optimizer: 2P/N + 4L; offload_params too: 4L
      ZeRO-2   2P weights + 6P/N grads + 12P/N Adam = 2P + 18P/N; offload_optimizer: 2P
      ZeRO-1   2P + 2P + 12P/N;  ZeRO-0  16P   (ZeRO paper, Rajbhandari et al. 2020, Fig. 1)
      fp32 training: 4 + 4 + 8 bytes instead of 2 + 4 + 12; LoRA: no grads or Adam (< 1% of P)
      all divided by tp (AutoTP shards every matrix)
    frozen models (reference, reward model): weights sharded like the actor, plus 2L gathered
    under ZeRO-3; 0 with train.ref_offload.
    activations of one micro-batch (the largest trained model; Korthikanti et al. 2022 with a
    flash kernel, so no attention matrix): 34 bytes x tokens x hidden per layer in bf16 (every
    layer without gradient checkpointing; with it, the layer inputs plus one layer), tokens =
    micro_batch_size x sequence (or RL's token budget, config/rules.token_budget), /
    ring_attn_size;
    logits: tokens x vocab x (2 + 4 + 4) bytes (bf16 output, fp32 copy, its gradient).
    weight-sync staging: 2 buckets of rollout.weight_sync_bucket_mb on trainer and vLLM ranks.
    runtime: CUDA context, NCCL buffers and allocator slack, a flat RUNTIME_GIB.
    vLLM engine rank: vLLM takes gpu_memory_utilization of the GPU (weights + KV cache).
    Colocated with vLLM sleep: the peak is max(train, vLLM); without sleep they add up.
    host RAM per node (what offloading moves off the GPU): fp32 grads + Adam = 16 bytes per
    parameter of each local rank's share with offload_optimizer, + 2 with offload_params,
    + the reference weights with ref_offload, x1.5 for pinned buffers (DeepSpeed's estimator).
Parameter counts and shapes: config.json at the model path, else model.num_params_b with a
Llama-proportioned shape (hidden = (128 P / 12)^(1/3), 32k vocabulary; the dry run says so:
guessed_shape_line), else a few known names.
Critic and reward model are the actor's size unless their own config.json says otherwise.
Checkpoint: 14 bytes per trained parameter (bf16 weights + fp32 Adam states); the save time is
its size over checkpoint.write_gb_s, checked against launch.signal_lead_s.
"""
from __future__ import annotations

import json
import math
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

from hpc_rlhf.config import JobConfig
from hpc_rlhf.config.rules import GENERATING_TRAINERS, token_budget
from hpc_rlhf.topology.layout import Layout

GIB = 1024 ** 3
RUNTIME_GIB = 1.5
CHECKPOINT_BYTES_PER_PARAM = 14
REQUEUE_MARGIN_S = 60  # of the signal lead, kept for torchrun's exit and the requeue itself
KNOWN_PARAMS = {"embedded:smollm2-135m": 134_515_008, "tiny:llama": 0, "tiny:qwen2": 0}


@dataclass(frozen=True)
class ModelShape:
    params: int
    hidden: int
    layers: int
    vocab: int

    @property
    def largest_layer(self) -> int:
        return self.vocab * self.hidden  # the embedding (or LM head): larger than any matrix


def params_from_hf_config(c: dict) -> int:
    """Dense decoder: embeddings (+ untied head) + layers x (attention + SwiGLU MLP + norms)."""
    h, layers, vocab = c["hidden_size"], c["num_hidden_layers"], c["vocab_size"]
    inter = c.get("intermediate_size", 4 * h)
    heads = c.get("num_attention_heads", 1)
    head_dim = c.get("head_dim") or h // heads
    kv = c.get("num_key_value_heads", heads) * head_dim
    attn = h * heads * head_dim + 2 * h * kv + heads * head_dim * h
    per_layer = attn + 3 * h * inter + 2 * h
    emb = vocab * h * (1 if c.get("tie_word_embeddings", False) else 2)
    return emb + layers * per_layer + h


def _hf_config(path: str) -> dict | None:
    """config.json of a model directory, or of a hub name's snapshot in the local hub cache."""
    cfg_file = Path(path) / "config.json"
    if not cfg_file.is_file() and path and not Path(path).exists():
        from hpc_rlhf.launch.preflight import hub_cache_model
        snapshot = hub_cache_model(path) if "/" in path else None
        cfg_file = snapshot / "config.json" if snapshot else cfg_file
    if not cfg_file.is_file():
        return None
    c = json.loads(cfg_file.read_text())
    return c.get("text_config", c)


def count_params(path: str, num_params_b: float = 0.0) -> int:
    """Parameters of the model at `path` (0 = unknown)."""
    if num_params_b:
        return int(num_params_b * 1e9)
    c = _hf_config(path)
    return params_from_hf_config(c) if c else KNOWN_PARAMS.get(path, 0)


def model_shape(path: str, num_params_b: float = 0.0) -> ModelShape | None:
    """The shape the memory plan needs (None when the parameter count is unknown)."""
    c = _hf_config(path)
    p = count_params(path, num_params_b)
    if c and p:
        return ModelShape(p, c["hidden_size"], c["num_hidden_layers"], c["vocab_size"])
    if not p:
        return None
    hidden = max(128, round((128 * p / 12) ** (1 / 3) / 128) * 128)  # Llama: layers = h / 128
    return ModelShape(p, hidden, max(1, round(p / (12 * hidden * hidden))), 32_000)


def guessed_shape_line(cfg: JobConfig) -> list:
    """One line when the actor's shape is guessed from model.num_params_b (no config.json at
    model.path or in the local hub cache): what the plan assumed and how to give the real one.
    The vocabulary matters: logits and the gathered embedding grow with it (Llama-3: 128,256)."""
    m = cfg.model
    if not m.num_params_b or _hf_config(m.path) is not None:
        return []
    from hpc_rlhf.launch.preflight import is_hub_name
    shape = model_shape(m.path, m.num_params_b)
    if is_hub_name(m.path):
        fix = (f"download its config into the hub cache (huggingface-cli download {m.path} "
               "config.json) or point model.path at a local model directory")
    else:
        fix = "point model.path at a local model directory (with its config.json)"
    return [f"== model shape guessed from model.num_params_b={m.num_params_b:g}: no config.json "
            f"for model.path={m.path!r} (not a local model directory, not in the local hub "
            f"cache), so the plan assumes hidden {shape.hidden}, {shape.layers} layers and a "
            f"{shape.vocab:,}-token vocabulary (a larger vocabulary needs more memory for logits "
            f"and the embedding); for the real shape, {fix}"]


def trained_model_bytes(shape: ModelShape, cfg: JobConfig, dp: int, tp: int,
                        lora: bool) -> dict:
    """{weights, grads, adam, gathered layer} bytes on one GPU for a trained model."""
    tr, p = cfg.train, shape.params
    w, g, a = (4, 4, 8) if cfg.model.dtype == "float32" else (2, 4, 12)
    trainable = 0 if lora else p
    z, n = tr.zero_stage, dp
    if z == 3:
        weights = 0 if tr.offload_params else w * p / n
        grads = 0 if tr.offload_optimizer else g * trainable / n
        adam = 0 if tr.offload_optimizer else a * trainable / n
        live = 4 * shape.largest_layer
    elif z == 2:
        weights, live = w * p, 0
        grads = 0 if tr.offload_optimizer else (g + w) * trainable / n
        adam = 0 if tr.offload_optimizer else a * trainable / n
    else:  # ZeRO-1 / 0: the paper's mixed-precision Adam (K = 12)
        weights, grads, live = w * p, w * trainable, 0
        adam = 0 if tr.offload_optimizer else a * trainable / (n if z == 1 else 1)
    return {"weights": weights / tp, "grads": grads / tp, "adam": adam / tp,
            "gathered layer": live / tp}


def frozen_model_bytes(shape: ModelShape, cfg: JobConfig, dp: int, tp: int,
                       offload: bool) -> float:
    w = 4 if cfg.model.dtype == "float32" else 2
    if offload:
        return 0.0
    if cfg.train.zero_stage == 3:
        return (w * shape.params / dp + w * shape.largest_layer) / tp
    return w * shape.params / tp


def activation_bytes(shape: ModelShape, cfg: JobConfig, sp: int) -> dict:
    """{activations, logits} of one micro-batch of the largest trained model (see the doc)."""
    d, tr = cfg.data, cfg.train
    seq = (d.max_prompt_len + cfg.rollout.max_new_tokens
           if tr.trainer in GENERATING_TRAINERS else d.max_len)
    tokens = (token_budget(cfg)[0] or tr.micro_batch_size * seq) / max(sp, 1)
    el = 4 if cfg.model.dtype == "float32" else 2
    per_layer = 17 * el * tokens * shape.hidden
    if cfg.model.gradient_checkpointing:
        acts = shape.layers * el * tokens * shape.hidden + per_layer
    else:
        acts = shape.layers * per_layer
    return {"activations": acts, "logits": tokens * shape.vocab * (el + 4 + 4)}


@dataclass(frozen=True)
class RankMemory:
    world: str
    ranks: str
    items: tuple       # ((label, bytes), ...)
    total: float


def _shapes(cfg: JobConfig) -> tuple:
    m = cfg.model
    actor = model_shape(m.path, m.num_params_b)
    critic = (model_shape(m.critic_path) if m.critic_path else None) or actor
    rm = (model_shape(m.reward_model_path) if m.reward_model_path else None) or actor
    return actor, critic, rm


def _trainer_items(cfg: JobConfig, layout: Layout, name: str, members, roles) -> list:
    actor, critic, rm = _shapes(cfg)
    tp = layout.tp_size if name in ("all", "actor", "critic") else 1
    dp = len(members) // tp
    items: list = []
    trained = []
    if "actor" in roles:
        trained.append(actor)
        items += [(f"actor {k}", v) for k, v in
                  trained_model_bytes(actor, cfg, dp, tp, cfg.model.lora_rank > 0).items()]
    if "critic" in roles:
        trained.append(critic)
        items += [(f"critic {k}", v) for k, v in
                  trained_model_bytes(critic, cfg, dp, tp, False).items()]
    if "ref" in roles:
        items.append(("ref weights", frozen_model_bytes(actor, cfg, dp, tp,
                                                        cfg.train.ref_offload)))
    if "reward" in roles:
        items.append(("reward model weights", frozen_model_bytes(rm, cfg, dp, tp, False)))
    if trained:
        biggest = max(trained, key=lambda sh: sh.params)
        items += list(activation_bytes(biggest, cfg, layout.sp_size).items())
    if cfg.train.trainer in GENERATING_TRAINERS:
        items.append(("weight-sync staging (2 buckets)",
                      2 * cfg.rollout.weight_sync_bucket_mb * 2 ** 20))
    return items


HOST_BUFFER_FACTOR = 1.5  # DeepSpeed's estimators' additional_buffer_factor (pinned buffers)


def offloaded_bytes(shape: ModelShape, cfg: JobConfig, dp: int, tp: int, lora: bool) -> float:
    """Host bytes of one rank's offloaded share of a trained model, before the buffer factor:
    fp32 grads + Adam (master weights and moments) with train.offload_optimizer (16 bytes per
    parameter in bf16), plus the weights with train.offload_params (18): what
    trained_model_bytes leaves off the GPU."""
    tr, p = cfg.train, shape.params
    w, g, a = (4, 4, 8) if cfg.model.dtype == "float32" else (2, 4, 12)
    trainable = 0 if lora else p
    n = dp if tr.zero_stage >= 1 else 1
    host = (g + a) * trainable / n if tr.offload_optimizer else 0.0
    if tr.offload_params:
        host += w * p / dp
    return host / tp


def host_memory_plan(cfg: JobConfig, layout: Layout) -> dict:
    """{node: {model: bytes}} of host RAM for CPU-offloaded states, DeepSpeed's buffer factor
    included (estimate_zero3_model_states_mem_needs; tests/unit/test_plan.py holds us to it)."""
    tr, m = cfg.train, cfg.model
    if not (tr.offload_optimizer or tr.offload_params or tr.ref_offload):
        return {}
    actor, critic, _ = _shapes(cfg)
    if actor is None:
        return {}
    w = 4 if m.dtype == "float32" else 2
    out: dict = {}
    for name, members in layout.worlds:
        info = layout.info(members[0])
        if not info.is_trainer:
            continue
        tp = layout.tp_size if name in ("all", "actor", "critic") else 1
        dp = len(members) // tp
        per_rank = {"actor": offloaded_bytes(actor, cfg, dp, tp, m.lora_rank > 0),
                    "critic": offloaded_bytes(critic, cfg, dp, tp, False),
                    "ref": (w * actor.params / (dp if tr.zero_stage == 3 else 1) / tp
                            if tr.ref_offload else 0.0)}
        for rank in members:
            node = out.setdefault(layout.info(rank).node, {})
            for model, b in per_rank.items():
                if model in info.roles and b:
                    node[model] = node.get(model, 0.0) + HOST_BUFFER_FACTOR * b
    return {node: models for node, models in out.items() if models}


def format_host_memory(plan: dict) -> list:
    """One line per group of nodes that need the same host RAM (none: no line)."""
    groups: dict = {}
    for node in sorted(plan):
        groups.setdefault(tuple(sorted(plan[node].items())), []).append(node)
    lines = []
    for models, nodes in groups.items():
        where = f"node {nodes[0]}" if len(nodes) == 1 else f"nodes {_ranges(nodes)}"
        parts = " + ".join(f"{model} {b / GIB:,.0f}" for model, b in models)
        total = sum(b for _, b in models) / GIB
        lines.append(f"== host RAM for CPU-offloaded states, {where}: {total:,.0f} GiB per node "
                     f"({parts}; in bf16 16 bytes per offloaded parameter, 18 with its weights, "
                     f"x{HOST_BUFFER_FACTOR:g} for buffers as DeepSpeed estimates): the nodes "
                     "need that much RAM free (launch.mem)")
    return lines


def _ranges(nodes: list) -> str:
    """[0, 1, 2, 5] -> '0-2,5'."""
    spans: list = []
    for n in nodes:
        if spans and n == spans[-1][1] + 1:
            spans[-1][1] = n
        else:
            spans.append([n, n])
    return ",".join(f"{a}-{b}" if a != b else f"{a}" for a, b in spans)


def memory_plan(cfg: JobConfig, layout: Layout, gpu_mem_gb: float) -> list:
    """One RankMemory per default world (all ranks of a world look alike); [] when the
    model's size is unknown."""
    r = cfg.rollout
    actor = _shapes(cfg)[0]
    if actor is None:
        return []
    out = []
    for name, members in layout.worlds:
        info = layout.info(members[0])
        items = _trainer_items(cfg, layout, name, members, info.roles) if info.is_trainer else []
        train = sum(v for _, v in items)
        vllm = 0.0
        if "rollout" in info.roles:
            wb = (4 if cfg.model.dtype == "float32" else 2) * actor.params / layout.engine_tp
            share = r.gpu_memory_utilization * gpu_mem_gb * GIB
            items.append((f"vLLM weights (TP {layout.engine_tp})", wb))
            items.append((f"vLLM KV cache + activations (to {r.gpu_memory_utilization:.0%} "
                          f"of {gpu_mem_gb:g} GiB)", max(share - wb, 0.0)))
            if not info.is_trainer:
                items.append(("weight-sync staging (2 buckets)",
                              2 * r.weight_sync_bucket_mb * 2 ** 20))
            vllm = max(wb, share)
        sleeps = layout.mode == "colocated" and r.enable_sleep
        items.append(("runtime (CUDA context, NCCL, allocator slack)", RUNTIME_GIB * GIB))
        total = (max(train, vllm) if sleeps else train + vllm) + RUNTIME_GIB * GIB
        rng = f"{members[0]}-{members[-1]}" if len(members) > 1 else f"{members[0]}"
        out.append(RankMemory(name, rng, tuple(items), total))
    return out


def format_memory(plan: list, gpu_mem_gb: float, colocated_sleep: bool) -> tuple:
    """(text, warnings)."""
    lines, warnings = [], []
    for rm in plan:
        lines.append(f"world {rm.world} (ranks {rm.ranks}): {rm.total / GIB:8.1f} GiB per GPU"
                     + ("  [train and vLLM time-share: peak = max]" if colocated_sleep and
                        any(label.startswith("vLLM") for label, _ in rm.items) else ""))
        for label, b in rm.items:
            lines.append(f"    {label:<52} {b / GIB:8.1f} GiB")
        if rm.total > gpu_mem_gb * GIB:
            warnings.append(f"WARNING: world {rm.world} needs ~{rm.total / GIB:.1f} GiB per GPU, "
                            f"more than --gpu-mem-gb={gpu_mem_gb:g}; raise train.zero_stage, "
                            "add ranks, turn on model.gradient_checkpointing, lower "
                            "train.micro_batch_size, or set train.offload_optimizer / "
                            "offload_params / ref_offload")
    return "\n".join(lines), warnings


def checkpoint_plan(cfg: JobConfig) -> tuple:
    """(text, warnings): checkpoint size, save time and the signal lead it must fit in."""
    actor, critic, _ = _shapes(cfg)
    if actor is None:
        return "size unknown (set model.num_params_b)", []
    models = [("actor", actor, cfg.model.lora_rank > 0)]
    if cfg.train.trainer == "rl" and cfg.algorithm.name == "ppo":
        models.append(("critic", critic, False))
    size = sum(sh.params * (0.02 if lora else CHECKPOINT_BYTES_PER_PARAM)
               for _, sh, lora in models)
    save_s = size / (cfg.checkpoint.write_gb_s * 1e9)
    lead = cfg.launch.signal_lead_s
    text = (f"{'+'.join(n for n, _, _ in models)}: {size / 1e9:,.0f} GB (weights + optimizer "
            f"states); ~{save_s:,.0f} s at checkpoint.write_gb_s={cfg.checkpoint.write_gb_s:g}; "
            f"launch.signal_lead_s={lead} leaves {lead - REQUEUE_MARGIN_S} s for the current "
            "step and the save")
    warnings = []
    if save_s > (lead - REQUEUE_MARGIN_S) / 2:
        need = math.ceil((2 * save_s + REQUEUE_MARGIN_S) / 60) * 60
        warnings.append(
            f"WARNING: a checkpoint takes ~{save_s:,.0f} s, more than half of the "
            f"{lead - REQUEUE_MARGIN_S} s the signal lead leaves (the step in progress must "
            f"finish first): a preempted job may be killed mid-save and lose the work since the "
            f"last checkpoint; raise launch.signal_lead_s to >= {need} (or measure your "
            "filesystem and set checkpoint.write_gb_s)")
    return text, warnings


def torchrun_argv(cfg_path: str | None, overrides: list, nnodes: int, nproc: int,
                  endpoint: str, rdzv_id: str, shutdown_timeout_s: int,
                  python: str = sys.executable, is_host: bool | None = None,
                  max_restarts: int = 0) -> list:
    """The exact torchrun command every node runs (one agent per node). `is_host`: whether this
    node hosts the rendezvous store (None: torchrun matches the endpoint to its hostname)."""
    host = [] if is_host is None else ["--rdzv-conf", f"is_host={str(is_host).lower()}"]
    argv = [python, "-m", "torch.distributed.run", "--nnodes", str(nnodes),
            "--nproc-per-node", str(nproc), "--rdzv-backend", "c10d",
            "--rdzv-endpoint", endpoint, "--rdzv-id", rdzv_id, *host,
            "--max-restarts", str(max_restarts),
            "--signals-to-handle", "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1,SIGUSR2",
            "--shutdown-timeout", str(shutdown_timeout_s),
            "-m", "hpc_rlhf.launch.main"]
    if cfg_path:
        argv += ["--config", cfg_path]
    return argv + list(overrides)


def torchrun_env(max_restarts: int) -> dict:
    """Environment torchrun itself needs. With restarts: its rendezvous store is shared with
    the ranks by default (torch >= 2.3), so a restarted round would read the previous round's
    process-group keys and fail to connect (pytorch issue 135712); unshared, rank 0 hosts a
    fresh store every round."""
    return {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"} if max_restarts > 0 else {}


def shell_join(argv: list) -> str:
    return " ".join(shlex.quote(a) for a in argv)
