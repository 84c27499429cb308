"""MoE auxiliary (router load-balancing) loss pass-through for training forwards.

HF mixture-of-experts causal LMs (Mixtral, Qwen2-MoE, Qwen3-MoE, ...) return `aux_loss`, the
Switch-Transformer load-balancing loss over every MoE layer's router logits, when the forward
gets `output_router_logits=True`. HF adds it to `loss` only when `labels` are passed, which our
trainers never do (they compute their own losses from logits), so without this module the
routers get no balancing gradient at all.

    aux = attach_router_aux_loss(engine, cfg.train.aux_loss_coef)   # once; idempotent
    logits = ... engine(...) ...                                     # any forward helper
    loss = aux.add_to(loss)                                          # loss + coef * aux_loss

`attach_router_aux_loss` puts two hooks on the trained module (inside a DeepSpeed engine, the
peft wrapper if any): a pre-hook that turns `output_router_logits` on for its forwards, and a
hook that keeps the forward's `aux_loss`. With coef 0 nothing is attached and `add_to` returns
the loss untouched, so dense models pay nothing. The forward helpers (engine/logprobs.py,
recipe_common.py) stay unchanged: they keep returning logits.
"""
from __future__ import annotations

import torch
from torch import nn

AUX_FIELD = "train.aux_loss_coef"
_ATTR = "_hpc_rlhf_router_aux"
_EXPERT_KEYS = ("num_local_experts", "num_experts")


def trained_module(model: nn.Module) -> nn.Module:
    """A DeepSpeed engine's module, else the model itself (a peft wrapper stays: its forward
    calls the HF model's `.forward` directly, bypassing hooks placed on the HF model)."""
    return getattr(model, "module", model)


def is_moe_config(config) -> bool:
    """True when the HF config has router settings (MoE layers that can return router logits)."""
    return (hasattr(config, "output_router_logits")
            and any(getattr(config, k, None) for k in _EXPERT_KEYS))


def check_moe_model(model: nn.Module, coef: float, field: str = AUX_FIELD) -> None:
    """Raise when an aux-loss coefficient is set for a model without MoE routers."""
    if coef < 0:
        raise ValueError(f"{field}={coef} must be >= 0; set {field}=0 (off) or a positive value")
    if coef == 0:
        return
    config = getattr(trained_module(model), "config", None)
    if config is None or not is_moe_config(config):
        arch = getattr(config, "model_type", type(trained_module(model)).__name__)
        raise ValueError(
            f"{field}={coef} needs a mixture-of-experts model (a config with "
            f"output_router_logits and num_experts / num_local_experts, e.g. Mixtral, "
            f"Qwen2-MoE, Qwen3-MoE), but the model is {arch!r} (dense); set {field}=0")


class RouterAuxLoss:
    """Records the `aux_loss` of the forwards of one module; `add_to` adds coef x it."""

    def __init__(self, model: nn.Module, coef: float, field: str = AUX_FIELD):
        check_moe_model(model, coef, field)
        self.coef, self.field = float(coef), field
        self.last: torch.Tensor | None = None
        self._handles = []
        if self.coef > 0:
            target = trained_module(model)
            self._handles = [
                target.register_forward_pre_hook(self._ask_router_logits, with_kwargs=True),
                target.register_forward_hook(self._keep_aux_loss)]

    @property
    def enabled(self) -> bool:
        return self.coef > 0

    @staticmethod
    def _ask_router_logits(module, args, kwargs):
        return args, {**kwargs, "output_router_logits": True}

    def _keep_aux_loss(self, module, args, output) -> None:
        aux = getattr(output, "aux_loss", None)
        if aux is None and isinstance(output, dict):
            aux = output.get("aux_loss")
        if not isinstance(aux, torch.Tensor):  # HF returns int 0 when no router logits came back
            raise RuntimeError(
                f"{self.field}={self.coef}: the forward of {type(module).__name__} returned no "
                "aux_loss tensor although output_router_logits=True was passed; this model's "
                f"forward does not support the MoE auxiliary loss; set {self.field}=0")
        self.last = aux

    def pop(self) -> torch.Tensor:
        """The last forward's aux loss (a scalar with grad in training), then forgotten, so a
        forward that recorded nothing can never reuse an old value."""
        if self.last is None:
            raise RuntimeError("no forward of the MoE model ran since the last aux loss was used")
        aux, self.last = self.last, None
        return aux

    def add_to(self, loss: torch.Tensor, metrics: dict | None = None,
               key: str = "moe_aux_loss") -> torch.Tensor:
        """loss + coef * aux_loss of the last forward (loss itself when off); the raw aux loss
        goes to metrics[key] when a dict is given."""
        if not self.enabled:
            return loss
        aux = self.pop()
        if metrics is not None:
            metrics[key] = aux.item()
        return loss + self.coef * aux.to(loss.dtype)

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        self.last = None


def attach_router_aux_loss(model: nn.Module, coef: float, field: str = AUX_FIELD
                           ) -> RouterAuxLoss:
    """The model's RouterAuxLoss, created on first use (repeat calls return the same one, so a
    train step can call this every step); a different coef replaces the hooks."""
    target = trained_module(model)
    current = target.__dict__.get(_ATTR)
    if current is not None and current.coef == float(coef) and current.field == field:
        return current
    if current is not None:
        current.close()
    aux = RouterAuxLoss(model, coef, field)
    target.__dict__[_ATTR] = aux
    return aux
