"""The dry-run plan: layout per node/GPU, memory per rank, the exact commands.

Memory model (per GPU, bytes; P = parameters of one model, dp = its ZeRO data-parallel size,
tp = AutoTP size; bf16/fp16 mixed precision with fp32 Adam, as in the ZeRO paper):

    weights   2P  (fp32: 4P)    divided by dp under ZeRO-3, 0 on GPU with offload_params
    grads     2P  (fp32: 4P)    divided by dp under ZeRO-2/3
    Adam     12P  (fp32 master + m + v; fp32 training: 8P)   divided by dp under ZeRO-1/2/3,
                                0 on GPU with offload_optimizer
    all three divided by tp (AutoTP shards every matrix; ZeRO-3 + AutoTP is refused by rules)
    => ZeRO-3: (2 + 2 + 12) P / dp = 16 P / dp   (ZeRO paper, Rajbhandari et al. 2020, Fig. 1)
    frozen models (reference, reward model): weights only, sharded like the actor (ZeRO-3:
    /dp), 0 with train.ref_offload.
    vLLM engine rank: weights 2P / engine_tp, and vLLM reserves gpu_memory_utilization of the
    GPU in total (weights + activations + KV cache): the rank's figure is max(weights, share).
    Colocated: vLLM sleeps while training (rollout.enable_sleep), so the peak is
    max(train, vLLM); without sleep they add up.
Not counted: activations (depend on micro-batch, length, checkpointing), ZeRO-3 gather
buffers (~stage3_max_live_parameters x 2 B), CUDA context (~0.5-1 GiB), fragmentation.
Parameter counts: model.num_params_b, else config.json at model.path (dense decoder formula),
else a few known names. Critic and reward model are assumed the actor's size unless they have
their own config.json (model.critic_path / model.reward_model_path).
"""
from __future__ import annotations

import json
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

from hpc_rlhf.config import JobConfig
from hpc_rlhf.topology.layout import Layout

GIB = 1024 ** 3
KNOWN_PARAMS = {"embedded:smollm2-135m": 134_515_008, "tiny:llama": 0, "tiny:qwen2": 0}


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


def count_params(path: str, num_params_b: float = 0.0) -> int:
    """Parameters of the model at `path` (0 = unknown)."""
    if num_params_b:
        return int(num_params_b * 1e9)
    cfg_file = Path(path) / "config.json"
    if cfg_file.is_file():
        c = json.loads(cfg_file.read_text())
        c = c.get("text_config", c)
        return params_from_hf_config(c)
    return KNOWN_PARAMS.get(path, 0)


def _bytes_per_param(dtype: str) -> tuple:
    return (4, 4, 8) if dtype == "float32" else (2, 2, 12)


def trained_model_bytes(p: int, cfg: JobConfig, dp: int, tp: int, lora: bool) -> dict:
    """{weights, grads, adam} bytes on one GPU for a trained model of `p` parameters."""
    tr = cfg.train
    w, g, a = _bytes_per_param(cfg.model.dtype)
    z = tr.zero_stage
    weights = 0 if tr.offload_params else w * p / (dp if z == 3 else 1) / tp
    trainable = 0 if lora else p  # LoRA adapters are < 1% of P: neglected
    grads = g * trainable / (dp if z >= 2 else 1) / tp
    adam = 0 if tr.offload_optimizer else a * trainable / (dp if z >= 1 else 1) / tp
    return {"weights": weights, "grads": grads, "adam": adam}


def frozen_model_bytes(p: int, cfg: JobConfig, dp: int, tp: int, offload: bool) -> float:
    w = _bytes_per_param(cfg.model.dtype)[0]
    return 0 if offload else w * p / (dp if cfg.train.zero_stage == 3 else 1) / tp


@dataclass(frozen=True)
class RankMemory:
    world: str
    ranks: str
    items: tuple       # ((label, bytes), ...)
    total: float


def memory_plan(cfg: JobConfig, layout: Layout, gpu_mem_gb: float) -> list:
    """One RankMemory per default world (all ranks of a world look alike)."""
    m, tr, r = cfg.model, cfg.train, cfg.rollout
    p_actor = count_params(m.path, m.num_params_b)
    p_critic = count_params(m.critic_path, 0) or p_actor if m.critic_path else p_actor
    p_rm = count_params(m.reward_model_path, 0) or p_actor if m.reward_model_path else p_actor
    lora = m.lora_rank > 0
    out = []
    for name, members in layout.worlds:
        info = layout.info(members[0])
        items: list = []
        train = 0.0
        if info.is_trainer:
            # ZeRO shards over every rank of the world but the AutoTP dimension (ring /
            # sequence-parallel ranks hold the same model, so they shard it too).
            tp = layout.tp_size if name in ("all", "actor", "critic") else 1
            dp = len(members) // tp
            if "actor" in info.roles:
                for k, v in trained_model_bytes(p_actor, cfg, dp, tp, lora).items():
                    items.append((f"actor {k}", v))
            if "critic" in info.roles:
                for k, v in trained_model_bytes(p_critic, cfg, dp, tp, False).items():
                    items.append((f"critic {k}", v))
            if "ref" in info.roles:
                items.append(("ref weights", frozen_model_bytes(p_actor, cfg, dp, tp,
                                                                tr.ref_offload)))
            if "reward" in info.roles:
                items.append(("reward model weights", frozen_model_bytes(p_rm, cfg, dp, tp,
                                                                         False)))
            train = sum(v for _, v in items)
        vllm = 0.0
        if "rollout" in info.roles:
            wb = _bytes_per_param(m.dtype)[0] * p_actor / layout.engine_tp
            share = r.gpu_memory_utilization * gpu_mem_gb * GIB
            items.append((f"vLLM weights (TP {layout.engine_tp})", wb))
            items.append((f"vLLM KV cache + activations (to {r.gpu_memory_utilization:.0%} "
                          f"of {gpu_mem_gb:g} GiB)", max(share - wb, 0.0)))
            vllm = max(wb, share)
        sleeps = layout.mode == "colocated" and r.enable_sleep
        total = max(train, vllm) if sleeps else train + vllm
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
                            "add ranks, or set train.offload_optimizer / offload_params / "
                            "ref_offload")
    return "\n".join(lines), warnings


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


def shell_join(argv: list) -> str:
    return " ".join(shlex.quote(a) for a in argv)
