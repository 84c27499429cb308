"""Offload / reload a DeepSpeed engine's training state around rollout (colocated mode).

Order: `report = offload_train_states(engine)` before vLLM wakes, `reload_train_states(engine,
report)` before training. On CUDA with ZeRO + DeepSpeed FusedAdam this is DeepSpeed's own
`offload_states` / `reload_states`. Elsewhere our fallback moves every optimizer-state tensor,
fp32 master partition and parameter to CPU (pinned) and back by swapping `.data`. On a CPU-only
machine the tensors already live on the host: nothing moves, but the bytes are still counted so
the memory schedule's accounting is exercised. `force_copy=True` makes the fallback copy into
fresh host buffers anyway (tests use it to prove the swap path restores state bit for bit).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class OffloadReport:
    """What an offload did: method used and bytes per state kind."""
    method: str                                        # "deepspeed" | "fallback" | "noop"
    bytes: dict[str, int] = field(default_factory=dict)
    _moved: list = field(default_factory=list, repr=False)   # (tensor, original device)

    @property
    def total_bytes(self) -> int:
        return sum(self.bytes.values())


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def train_state_tensors(engine) -> dict[str, list[torch.Tensor]]:
    """The engine's big tensors by kind: optimizer states, fp32 master weights, parameters."""
    opt = engine.optimizer
    inner = getattr(opt, "optimizer", opt)              # ZeRO wrappers hold the torch optimizer
    optim = [v for st in inner.state.values() for v in st.values()
             if torch.is_tensor(v) and v.numel() > 1]
    master = list(getattr(opt, "single_partition_of_fp32_groups", None)          # ZeRO-1/2
                  or getattr(opt, "fp32_partitioned_groups_flat", None) or [])   # ZeRO-3
    params = []
    for p in engine.module.parameters():
        t = getattr(p, "ds_tensor", None)               # ZeRO-3: the local shard
        params.append(t if t is not None else p)
    seen, out = set(), {}
    for kind, ts in (("optim_states", optim), ("hp_params", master), ("lp_params", params)):
        uniq = [t for t in ts if id(t) not in seen and t.numel() > 0]
        seen.update(id(t) for t in uniq)
        out[kind] = uniq
    return out


def _deepspeed_can_offload(engine) -> bool:
    if not torch.cuda.is_available() or engine.zero_optimization_stage() == 0:
        return False
    from hpc_rlhf.engine.deepspeed_strategy import _import_deepspeed
    deepspeed = _import_deepspeed()
    inner = getattr(engine.optimizer, "optimizer", None)
    return isinstance(inner, deepspeed.ops.adam.FusedAdam) and engine.zero_offload_param() is None


def offload_train_states(engine, *, force_copy: bool = False) -> OffloadReport:
    """Move training state off the accelerator (see module doc); returns what moved."""
    tensors = train_state_tensors(engine)
    sizes = {k: sum(_nbytes(t) for t in ts) for k, ts in tensors.items()}
    if _deepspeed_can_offload(engine) and not force_copy:
        engine.offload_states()
        return OffloadReport("deepspeed", sizes)
    report = OffloadReport("fallback", sizes)
    pin = torch.cuda.is_available()
    for ts in tensors.values():
        for t in ts:
            if t.device.type == "cpu" and not force_copy:
                continue
            host = torch.empty(t.shape, dtype=t.dtype, device="cpu", pin_memory=pin)
            host.copy_(t.data)
            report._moved.append((t, t.device))
            t.data = host
    if not report._moved:
        report.method = "noop"
    return report


def reload_train_states(engine, report: OffloadReport) -> None:
    """Undo `offload_train_states`."""
    if report.method == "deepspeed":
        engine.reload_states()
    for t, device in report._moved:
        if device.type == "cpu":           # force_copy on CPU: a fresh buffer, same device
            t.data = t.data.clone()
        else:
            t.data = t.data.to(device, non_blocking=True)
    if report._moved and torch.cuda.is_available():
        torch.cuda.synchronize()
    report._moved.clear()
