"""DeepSpeed training strategy: one object that turns HF models into DeepSpeed engines.

The only module that imports deepspeed (lazily, inside functions). Same code on CPU (gloo,
torch AdamW) and GPU (NCCL, DeepSpeed FusedAdam / CPUAdam). ZeRO 0-3, bf16/fp32, gradient
accumulation and clipping, gradient checkpointing, optimizer/parameter CPU offload, AutoTP.

Rank layout with AutoTP (DeepSpeed's mesh): tensor-parallel groups are consecutive ranks, so
`dp_rank = rank // autotp_size`; every rank of a TP group must be fed the same micro-batch.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, replace
from typing import Iterator

import torch
import torch.distributed as dist
from hpc_rlhf.topology import collectives

SCHEDULERS = ("constant", "linear", "cosine")
OPTIMIZERS = ("auto", "torch", "deepspeed")


@dataclass(frozen=True)
class StrategyConfig:
    """What the strategy needs; the global config maps onto these fields one to one."""
    zero_stage: int = 2                 # ZeRO stage 0..3
    bf16: bool = False                  # bf16 weights/activations with fp32 master weights
    # fp32 weights and optimizer, matmuls in bf16 (torch.autocast around every forward of the
    # engine: `compute_precision`). For CPUs: a bf16 copy of fp32 master weights rounds to
    # nearest, and on SmolLM2-135M 92% of the weights cannot move by one Adam step at lr 5e-5
    # (half a bf16 ulp is larger), so `bf16` barely learns there in a short run.
    autocast_bf16: bool = False
    micro_batch_size: int = 1           # samples per rank per forward
    grad_accum: int = 1                 # micro-batches per optimizer step
    max_grad_norm: float = 1.0          # global grad-norm clip; 0 disables
    lr: float = 1e-6
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.0           # applied to >=2-D params only (not norms/biases)
    warmup_steps: int = 0               # linear warmup: step s uses lr * (s + 1) / warmup_steps
    scheduler: str = "constant"         # after warmup: constant | linear | cosine to min_lr_ratio
    total_steps: int = 0                # optimizer steps for linear/cosine decay (>0 needed)
    min_lr_ratio: float = 0.1           # final lr / lr for linear/cosine
    optimizer: str = "auto"             # auto: torch AdamW on CPU, DeepSpeed Fused/CPU Adam on GPU
    offload_optimizer: bool = False     # ZeRO-Offload optimizer states to CPU (stage >= 1)
    offload_params: bool = False        # ZeRO-3 parameter offload to CPU
    ref_offload: bool = False           # frozen eval models keep ZeRO-3 params on CPU
    autotp_size: int = 1                # tensor-parallel ranks per model replica (AutoTP)
    gradient_checkpointing: bool = False
    seed: int = 42

    def __post_init__(self):
        errs = []
        if self.zero_stage not in (0, 1, 2, 3):
            errs.append(f"zero_stage={self.zero_stage} must be 0, 1, 2 or 3")
        for name in ("micro_batch_size", "grad_accum", "autotp_size"):
            if getattr(self, name) < 1:
                errs.append(f"{name}={getattr(self, name)} must be >= 1")
        if self.lr <= 0 or self.max_grad_norm < 0 or self.weight_decay < 0:
            errs.append(f"lr={self.lr} must be > 0, max_grad_norm={self.max_grad_norm} and "
                        f"weight_decay={self.weight_decay} >= 0")
        if self.bf16 and self.autocast_bf16:
            errs.append("bf16=True and autocast_bf16=True: choose one (bf16 weights, or fp32 "
                        "weights with bf16 matmuls)")
        if self.scheduler not in SCHEDULERS:
            errs.append(f"scheduler={self.scheduler!r} must be one of {SCHEDULERS}")
        if self.scheduler != "constant" and self.total_steps <= self.warmup_steps:
            errs.append(f"scheduler={self.scheduler!r} needs total_steps={self.total_steps} > "
                        f"warmup_steps={self.warmup_steps}")
        if self.optimizer not in OPTIMIZERS:
            errs.append(f"optimizer={self.optimizer!r} must be one of {OPTIMIZERS}")
        if self.offload_params and self.zero_stage != 3:
            errs.append(f"offload_params=True needs zero_stage=3 (got {self.zero_stage})")
        if self.offload_optimizer and self.zero_stage == 0:
            errs.append("offload_optimizer=True needs zero_stage >= 1 (got 0)")
        if errs:
            raise ValueError("invalid StrategyConfig: " + "; ".join(errs))


def lr_factor(cfg: StrategyConfig, step: int) -> float:
    """Multiplier of cfg.lr at optimizer step `step` (0-based)."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.scheduler == "constant":
        return 1.0
    frac = min(1.0, (step - cfg.warmup_steps) / (cfg.total_steps - cfg.warmup_steps))
    if cfg.scheduler == "linear":
        return 1.0 - (1.0 - cfg.min_lr_ratio) * frac
    return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * frac))


def effective_zero_stage(cfg: StrategyConfig, world_size: int, *, train: bool = True,
                         on_cuda: bool = False) -> int:
    """The ZeRO stage to run: the configured one, except on CPU in a world of ONE rank: there
    is nothing to partition, so stages 1-3 only add gather/release copies around every layer
    (measured on SmolLM2-135M, one CPU rank: ZeRO-3 train step +30% in bf16, +15% in fp32 over
    stage 0). Then stage 0 runs, unless CPU offload (optimizer, params, frozen model) needs ZeRO.
    On GPU the configured stage stays: colocated mode offloads the ZeRO states while vLLM holds
    the memory (hpc_rlhf/engine/offload.py)."""
    offload = (cfg.offload_optimizer or cfg.offload_params) if train else cfg.ref_offload
    if world_size == 1 and not offload and not on_cuda:
        return 0
    return cfg.zero_stage


def build_ds_config(cfg: StrategyConfig, *, train: bool = True, on_cuda: bool = False) -> dict:
    """The DeepSpeed JSON config for a trained (`train=True`) or frozen eval engine."""
    stage = cfg.zero_stage if train else (3 if cfg.zero_stage == 3 else 0)
    zero: dict = {"stage": stage}
    if stage == 3:
        zero.update(stage3_gather_16bit_weights_on_model_save=True)
    if train and cfg.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": on_cuda}
    if stage == 3 and (cfg.offload_params if train else cfg.ref_offload):
        zero["offload_param"] = {"device": "cpu", "pin_memory": on_cuda}
    ds = {
        "train_micro_batch_size_per_gpu": cfg.micro_batch_size,
        "gradient_accumulation_steps": cfg.grad_accum,
        "zero_optimization": zero,
        "bf16": {"enabled": cfg.bf16},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
        "zero_allow_untested_optimizer": True,
    }
    if cfg.autotp_size > 1:
        ds["tensor_parallel"] = {"autotp_size": cfg.autotp_size}
    if train:
        ds["gradient_clipping"] = cfg.max_grad_norm
        use_torch = cfg.optimizer == "torch" or (cfg.optimizer == "auto" and not on_cuda)
        params = {"lr": cfg.lr, "betas": list(cfg.betas), "eps": cfg.eps,
                  "weight_decay": cfg.weight_decay}
        if use_torch:
            params["torch_adam"] = True
        ds["optimizer"] = {"type": "AdamW", "params": params}
        if cfg.offload_optimizer and use_torch:
            ds["zero_force_ds_cpu_optimizer"] = False
    return ds


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: decay on >=2-D trainable params, none on norms and biases."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def begin_forward(model) -> None:
    """Call before a training forward that runs a DeepSpeed engine's submodules directly
    (e.g. its decoder and output head apart, recipes/rl/shared_prompt.py) instead of
    `engine(...)`. ZeRO starts each micro-step in the engine's own forward
    (`optimizer.clear_backward_seen_flag()`: ZeRO-3 advances its micro_step_id there, and its
    first micro-step overwrites the partitioned gradient instead of adding to it), so without
    this every micro-batch of an accumulation step but the last is dropped (measured: gradient
    off by 70% with 2 micro-batches on 2 ZeRO-3 ranks). No-op for plain modules."""
    optimizer = getattr(model, "optimizer", None)
    if hasattr(optimizer, "clear_backward_seen_flag"):
        optimizer.clear_backward_seen_flag()


def _import_deepspeed():
    from hpc_rlhf.engine.op_cache import clear_stale_locks, ensure_extensions_dir
    ensure_extensions_dir()
    clear_stale_locks()
    try:
        import deepspeed
    except ImportError as e:  # pragma: no cover - deepspeed is a hard dependency
        raise ImportError("hpc_rlhf training needs deepspeed: pip install 'deepspeed>=0.16'") from e
    return deepspeed


class DeepSpeedStrategy:
    """Builds and drives DeepSpeed engines for one training role."""

    def __init__(self, cfg: StrategyConfig):
        self.cfg = cfg
        self.on_cuda = torch.cuda.is_available()

    # ---- process groups -------------------------------------------------------------------
    def setup_distributed(self, timeout_s: float = 600.0) -> None:
        """Join the default world (gloo on CPU, NCCL on GPU); a 1-rank world without torchrun.

        If a default group already exists (the topology code made one), it is used as is.
        """
        import datetime
        deepspeed = _import_deepspeed()
        if not dist.is_initialized():
            if "RANK" not in os.environ:  # plain `python script.py`: a world of one
                os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1",
                                  MASTER_ADDR=os.environ.get("MASTER_ADDR", "127.0.0.1"))
                os.environ.setdefault("MASTER_PORT", str(_free_port()))
            backend = "nccl" if self.on_cuda else "gloo"
            if self.on_cuda:
                torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
            deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False,
                                       timeout=datetime.timedelta(seconds=timeout_s))
            collectives.destroy_world_at_exit()  # this strategy made the world
        else:
            # A group made elsewhere (topology code, vLLM in-process): DeepSpeed still reads
            # RANK / WORLD_SIZE / LOCAL_RANK from the environment and asserts they exist.
            os.environ.setdefault("RANK", str(dist.get_rank()))
            os.environ.setdefault("WORLD_SIZE", str(dist.get_world_size()))
            if "LOCAL_RANK" not in os.environ:
                if dist.get_world_size() > 1:
                    raise RuntimeError("LOCAL_RANK is not set but the default process group has "
                                       f"{dist.get_world_size()} ranks: launch with torchrun "
                                       "or set LOCAL_RANK before setup_distributed()")
                os.environ["LOCAL_RANK"] = "0"
            deepspeed.init_distributed(dist_backend=dist.get_backend(), auto_mpi_discovery=False)
        world = dist.get_world_size()
        if world % self.cfg.autotp_size:
            raise ValueError(f"autotp_size={self.cfg.autotp_size} must divide the training world "
                             f"size {world}")
        self.set_seed(self.cfg.seed)

    @property
    def rank(self) -> int:
        return dist.get_rank() if dist.is_initialized() else 0

    @property
    def world_size(self) -> int:
        return dist.get_world_size() if dist.is_initialized() else 1

    @property
    def dp_size(self) -> int:
        return self.world_size // self.cfg.autotp_size

    @property
    def dp_rank(self) -> int:
        """Data-parallel rank: which shard of each batch this rank reads."""
        return self.rank // self.cfg.autotp_size

    @property
    def device(self) -> torch.device:
        if self.on_cuda:
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    @staticmethod
    def set_seed(seed: int) -> None:
        import random

        import numpy as np
        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.manual_seed(seed)

    # ---- engines --------------------------------------------------------------------------
    def prepare_model(self, model: torch.nn.Module, *, train: bool = True):
        """Wrap a model (HF, peft or our value model) into a DeepSpeed engine.

        train=True: AdamW (param groups without decay on norms/biases) and the warmup/decay
        schedule, stepped by `step`. train=False: the same as `prepare_eval_model`.
        """
        if not train:
            return self.prepare_eval_model(model)
        deepspeed = _import_deepspeed()
        if self.cfg.gradient_checkpointing:
            _enable_gradient_checkpointing(model)
        cfg = self.cfg

        def scheduler(optimizer):
            return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(cfg, s))

        engine, *_ = deepspeed.initialize(
            model=model, model_parameters=param_groups(model, cfg.weight_decay),
            lr_scheduler=scheduler, config=build_ds_config(self._run_cfg(train=True), train=True,
                                                           on_cuda=self.on_cuda),
            dist_init_required=False)
        return self._mark_precision(engine)

    def _mark_precision(self, engine):
        """Record on the engine how its forwards compute (read by `compute_precision`)."""
        engine.hpc_autocast = torch.bfloat16 if self.cfg.autocast_bf16 else None
        return engine

    @property
    def sync_dtype(self) -> torch.dtype | None:
        """The dtype a rollout engine serves the weights in when it differs from the trained
        weights' (autocast_bf16: fp32 weights, bf16 engine); None: send them as they are."""
        return torch.bfloat16 if self.cfg.autocast_bf16 else None

    @property
    def zero_stage(self) -> int:
        """The ZeRO stage the trainers of this world run (after `effective_zero_stage`)."""
        return effective_zero_stage(self.cfg, self.world_size, train=True, on_cuda=self.on_cuda)

    def _run_cfg(self, *, train: bool) -> StrategyConfig:
        """cfg with the ZeRO stage this world actually runs (`effective_zero_stage`)."""
        stage = effective_zero_stage(self.cfg, self.world_size, train=train, on_cuda=self.on_cuda)
        if stage != self.cfg.zero_stage and not getattr(self, "_said_stage", False):
            self._said_stage = True
            if self.rank == 0:
                print(f"[train] train.zero_stage={self.cfg.zero_stage} in a 1-rank world "
                      "partitions nothing: running ZeRO stage 0 (no gather/release copies)",
                      flush=True)
        return replace(self.cfg, zero_stage=stage)

    def prepare_eval_model(self, model: torch.nn.Module):
        """A frozen engine (reference / reward model): ZeRO-3 inference when training uses
        ZeRO-3 (params offloaded to CPU with cfg.ref_offload), otherwise a plain replica."""
        deepspeed = _import_deepspeed()
        model.requires_grad_(False)
        engine, *_ = deepspeed.initialize(
            model=model, config=build_ds_config(self._run_cfg(train=False), train=False,
                                                on_cuda=self.on_cuda),
            dist_init_required=False)
        engine.eval()
        return self._mark_precision(engine)

    def backward(self, loss: torch.Tensor, engine, *, weight: float | None = None,
                 boundary: bool | None = None) -> None:
        """Backward of one micro-batch loss. Fixed micro-batches (weight None): DeepSpeed
        divides the loss by grad_accum and steps every grad_accum micro-batches. Dynamic ones
        (recipes/rl/micro.py): the loss is multiplied by `weight` (its share of the optimizer
        step) and `boundary` marks the step's last micro-batch, where `step` updates."""
        if weight is None:
            engine.backward(loss)
            return
        engine.set_gradient_accumulation_boundary(bool(boundary))
        engine.backward(loss * weight, scale_wrt_gas=False)

    def step(self, engine) -> None:
        """Optimizer + scheduler step at the accumulation boundary; no-op on other micro-steps."""
        engine.step()

    # ---- weights --------------------------------------------------------------------------
    def gathered_state(self, engine_or_module, alloc=None, dtype: torch.dtype | None = None
                       ) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, full tensor) for every parameter, gathering ZeRO-3 and AutoTP shards.

        Collective: every rank of the engine must iterate it to the end. Tensors are fresh
        copies (safe to keep); names are the module's (peft names for LoRA models: use
        hpc_rlhf.models.lora.merged_state for merged base names). alloc(shape, dtype): where
        the copies go (a weight-sync sender's staging ring, so its buckets need no packing
        copy; such tensors are valid only until the consumer moves on), default new tensors.
        dtype: cast floating-point copies to it (None: the parameters' own dtype).
        """
        deepspeed = _import_deepspeed()
        from deepspeed.module_inject.layers import GatherReplacedLayerParams
        module = getattr(engine_or_module, "module", engine_or_module)
        autotp = self.cfg.autotp_size > 1
        seen: set[int] = set()
        for mod_name, mod in module.named_modules():
            own = [(n, p) for n, p in mod.named_parameters(recurse=False) if id(p) not in seen]
            if not own:
                continue
            params = [p for _, p in own]
            seen.update(id(p) for p in params)
            zero3 = any(hasattr(p, "ds_id") for p in params)
            with deepspeed.zero.GatheredParameters(params, enabled=zero3):
                with GatherReplacedLayerParams(params, mod, enabled=autotp):
                    out = [(f"{mod_name}.{n}" if mod_name else n, _copy(p, alloc, dtype))
                           for n, p in own]
            yield from out

    # ---- checkpoints ----------------------------------------------------------------------
    def save_checkpoint(self, root, step: int, engines: dict, extra_state: dict | None = None,
                        keep_last: int = 3):
        """Atomic checkpoint of `engines` ({"actor": engine, ...}) + RNG + extra state."""
        from hpc_rlhf.checkpoint.store import save_checkpoint
        return save_checkpoint(root, step, engines, extra_state, keep_last=keep_last)

    def load_checkpoint(self, root, engines: dict, step: int | None = None):
        """Restore the newest complete checkpoint (or `step`); returns (step, extra_state) or None."""
        from hpc_rlhf.checkpoint.store import load_checkpoint
        return load_checkpoint(root, engines, step=step)

    # ---- metrics --------------------------------------------------------------------------
    def all_reduce_mean(self, metric, group=None):
        """Mean of a float or tensor over the world (or `group`); returns the same kind."""
        is_tensor = torch.is_tensor(metric)
        t = (metric.detach().clone() if is_tensor else torch.tensor(float(metric))).to(
            torch.float64 if not self.on_cuda else torch.float32)
        t = collectives.all_reduce(t, "sum", group) / collectives.size_of(group)
        return t.to(metric.dtype).cpu() if is_tensor else t.item()


def _enable_gradient_checkpointing(model) -> None:
    target = getattr(model, "hf", model)  # our value model wraps the HF model as .hf
    kwargs = {"gradient_checkpointing_kwargs": {"use_reentrant": False}}
    target.gradient_checkpointing_enable(**kwargs)
    if hasattr(target, "enable_input_require_grads"):  # peft: frozen embeddings need this
        target.enable_input_require_grads()


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _copy(p: torch.Tensor, alloc, dtype: torch.dtype | None = None) -> torch.Tensor:
    dtype = dtype if dtype is not None and p.is_floating_point() else p.dtype
    if alloc is None:
        return p.detach().to(dtype, copy=True)
    out = alloc(tuple(p.shape), dtype)
    out.copy_(p.detach())
    return out


# ---- reading a checkpoint offline (no world, no GPU) ---------------------------------------
def consolidated_state(step_dir, tag: str) -> tuple[dict, torch.dtype]:
    """(full fp32 state dict of engine `tag` in checkpoint `step_dir`, the dtype it trained
    in), from the shards every rank wrote (ZeRO-1/2/3: DeepSpeed's zero_to_fp32; ZeRO-0: the
    module itself). AutoTP checkpoints (one model file per TP rank) are refused."""
    from pathlib import Path
    _import_deepspeed()
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    tag_dir = Path(step_dir) / tag
    import re
    models = sorted(tag_dir.glob("*mp_rank_*_model_states.pt"))  # ZeRO-3: one per DP rank
    if not models:
        raise FileNotFoundError(f"{tag_dir} holds no DeepSpeed model states; is {step_dir} a "
                                "complete checkpoint (checkpoints/step_N)?")
    tp_ranks = {re.search(r"mp_rank_(\d+)", m.name).group(1) for m in models}
    if len(tp_ranks) > 1:
        raise ValueError(f"{tag_dir} is an AutoTP checkpoint ({len(tp_ranks)} tensor-parallel "
                         "shards); export it from a run instead (checkpoint.export_hf=true)")
    meta = torch.load(models[0], map_location="cpu", weights_only=False, mmap=True)
    ds = meta.get("ds_config", {})
    dtype = (torch.bfloat16 if ds.get("bf16", {}).get("enabled") else
             torch.float16 if ds.get("fp16", {}).get("enabled") else torch.float32)
    if any(tag_dir.glob("*optim_states.pt")) and ds.get("zero_optimization", {}).get("stage"):
        state = get_fp32_state_dict_from_zero_checkpoint(str(step_dir), tag=tag)
    else:
        state = {k: v.float() for k, v in meta["module"].items()}
    return dict(state), dtype


def compute_precision(engine):
    """The context every forward of `engine` runs in: torch.autocast to bf16 for an engine
    built with autocast_bf16 (fp32 weights, bf16 matmuls), else nothing. Backward passes reuse
    the dtypes their forward chose, so they need no context."""
    import contextlib
    dtype = getattr(engine, "hpc_autocast", None)
    if dtype is None:
        return contextlib.nullcontext()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.autocast(device_type=device, dtype=dtype)
