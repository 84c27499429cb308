"""KL estimators between the policy and the reference model, and KL coefficient controllers.

The estimators are Schulman's (http://joschu.net/blog/kl-approx.html), per token, with
r = ref_logp - logp (log of pi_ref / pi on a token sampled from pi):
  k1 = -r                 unbiased, can be negative
  k2 = r^2 / 2            biased, non-negative (its gradient is the k1 KL-in-reward gradient)
  k3 = exp(r) - 1 - r     unbiased, non-negative
Like OpenRLHF, the result is clamped to [-10, 10] so that one wild token (r of, say, 30 gives
exp(30)) cannot dominate a batch; pass clamp=None to disable.
"""
from __future__ import annotations

import math

import torch

KL_KINDS = ("k1", "k2", "k3")


def kl_estimate(
    logp: torch.Tensor,  # [batch, resp_len] log pi(token)
    ref_logp: torch.Tensor,  # [batch, resp_len] log pi_ref(token)
    kind: str = "k1",
    clamp: float | None = 10.0,
) -> torch.Tensor:
    """Per-token KL(pi || pi_ref) estimate, [batch, resp_len], computed in >= float32.

    Differentiable with respect to `logp` (use it as a KL loss) and to `ref_logp`. Values at
    padding positions are meaningless: reduce with a mask.
    """
    if kind not in KL_KINDS:
        raise ValueError(f"kl kind={kind!r} is unknown; valid kinds: {', '.join(KL_KINDS)}")
    if logp.shape != ref_logp.shape:
        raise ValueError(f"logp {tuple(logp.shape)} and ref_logp {tuple(ref_logp.shape)} differ")
    dtype = torch.promote_types(torch.promote_types(logp.dtype, ref_logp.dtype), torch.float32)
    log_ratio = logp.to(dtype) - ref_logp.to(dtype)  # log pi / pi_ref
    if kind == "k1":
        kl = log_ratio
    elif kind == "k2":
        kl = 0.5 * log_ratio**2
    else:
        r = -log_ratio
        kl = torch.expm1(r) - r  # expm1: exact near r = 0 where exp(r) - 1 cancels
    if clamp is not None:
        kl = kl.clamp(min=-clamp, max=clamp)
    return kl


class FixedKLController:
    """A KL coefficient that never changes. Same interface as AdaptiveKLController."""

    def __init__(self, kl_coef: float) -> None:
        if not (kl_coef >= 0.0 and math.isfinite(kl_coef)):
            raise ValueError(f"kl_coef={kl_coef} must be a finite number >= 0")
        self.value = float(kl_coef)

    def update(self, current_kl: float, n_steps: int) -> float:
        return self.value


class AdaptiveKLController:
    """Adaptive KL coefficient (Ziegler et al. 2019, https://arxiv.org/abs/1909.08593).

    After each batch: e = clip(current_kl / target - 1, -0.2, 0.2) and
    value *= 1 + e * n_steps / horizon, so the KL is steered towards `target` over roughly
    `horizon` samples. `n_steps` is the number of samples (or steps) the measured KL covers.
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: float) -> None:
        if not (init_kl_coef > 0.0 and math.isfinite(init_kl_coef)):
            raise ValueError(
                f"init_kl_coef={init_kl_coef} must be > 0 for an adaptive controller "
                "(a zero coefficient can never grow); use FixedKLController(0.0) to disable KL"
            )
        if not target > 0.0:
            raise ValueError(f"kl target={target} must be > 0")
        if not horizon > 0.0:
            raise ValueError(f"kl horizon={horizon} must be > 0")
        self.value = float(init_kl_coef)
        self.target = float(target)
        self.horizon = float(horizon)

    def update(self, current_kl: float, n_steps: int) -> float:
        error = min(max(float(current_kl) / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon
        return self.value


def make_kl_controller(
    init_kl_coef: float, target: float | None = None, horizon: float = 10000.0
) -> FixedKLController | AdaptiveKLController:
    """Adaptive controller when a KL `target` is given, fixed coefficient otherwise."""
    if target is None:
        return FixedKLController(init_kl_coef)
    return AdaptiveKLController(init_kl_coef, target, horizon)
