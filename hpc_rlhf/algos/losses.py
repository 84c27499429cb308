"""PPO-family losses: clipped policy loss (PPO / DAPO clip-higher / dual-clip / GSPO) with
TIS and ICEPOP rollout correction, the clipped value loss, and a chunked entropy.

Log-probabilities:
  logp          log pi_theta(token), the policy being trained (carries the gradient)
  old_logp      log pi_old(token), recomputed by the trainer before the update
  rollout_logp  log pi_rollout(token), as returned by the inference engine (vLLM)
The PPO ratio is pi_theta / pi_old. The rollout correction weight is
rho = pi_old / pi_rollout = exp(old_logp - rollout_logp): it corrects for the engine sampling
from a slightly different distribution (other kernels, precision, stale weights).
"""
from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

from hpc_rlhf.algos.masked import masked_mean, masked_sum

LOSS_AGGS = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm")
# |log pi_theta - log pi_old| is clamped here before exp: exp(20) ~ 5e8 is far outside any clip
# range, so the clipped objective and its gradient are unchanged wherever the ratio is sane,
# while a ratio of e^100 (a stale or broken old_logp) no longer overflows to inf and NaN.
LOG_RATIO_CLAMP = 20.0
IMPORTANCE_LEVELS = ("token", "sequence")

__all__ = [
    "LOSS_AGGS",
    "IMPORTANCE_LEVELS",
    "aggregate_loss",
    "entropy_from_logits",
    "masked_mean",
    "masked_sum",
    "policy_loss",
    "value_loss",
]


def aggregate_loss(
    loss_tok: torch.Tensor,  # [batch, resp_len]
    action_mask: torch.Tensor,  # [batch, resp_len]
    loss_agg: str = "token_mean",
    max_len: int | None = None,
) -> torch.Tensor:
    """Reduce a per-token loss to a scalar.

    token_mean               sum over all action tokens / number of action tokens (DAPO).
    seq_mean_token_mean      mean over rows of each row's token mean (GRPO paper, GSPO); rows
                             without action tokens are left out of the mean.
    seq_mean_token_sum_norm  sum over all action tokens / (batch * max_len) (Dr. GRPO: no
                             length normalisation). max_len should be a constant such as the
                             generation limit; None uses resp_len of this batch.
    """
    if loss_agg == "token_mean":
        return masked_mean(loss_tok, action_mask)
    if loss_agg == "seq_mean_token_mean":
        per_seq = masked_mean(loss_tok, action_mask, dim=-1)  # [batch]
        has_tokens = action_mask.bool().any(dim=-1)
        return masked_mean(per_seq, has_tokens)
    if loss_agg == "seq_mean_token_sum_norm":
        norm = loss_tok.shape[-1] if max_len is None else max_len
        if norm <= 0:
            raise ValueError(
                f"max_len={max_len} must be > 0 for loss_agg='seq_mean_token_sum_norm'"
            )
        return masked_sum(loss_tok, action_mask) / (loss_tok.shape[0] * norm)
    raise ValueError(f"loss_agg={loss_agg!r} is unknown; valid: {', '.join(LOSS_AGGS)}")


def policy_loss(
    logp: torch.Tensor,  # [batch, resp_len]
    old_logp: torch.Tensor,  # [batch, resp_len]
    advantages: torch.Tensor,  # [batch, resp_len]
    action_mask: torch.Tensor,  # [batch, resp_len]
    *,
    clip_eps_low: float = 0.2,
    clip_eps_high: float = 0.2,
    dual_clip: float | None = None,
    loss_agg: str = "token_mean",
    importance: str = "token",
    rollout_logp: torch.Tensor | None = None,  # [batch, resp_len]
    tis_cap: float | None = None,
    icepop: tuple[float, float] | None = None,
    max_len: int | None = None,
    tis_floor: float = 0.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped surrogate loss -min(ratio * A, clip(ratio, 1 - low, 1 + high) * A).

    importance="token": ratio = exp(logp - old_logp) per token (PPO). importance="sequence":
    GSPO, ratio = exp(mean over the row's action tokens of (logp - old_logp)), in the
    GSPO-token form sg[s_i] * pi/sg[pi] so token-level advantages are allowed; with a per-row
    advantage and loss_agg="seq_mean_token_mean" its gradient is exactly GSPO's.
    dual_clip (> 1): for A < 0 the loss is capped at -dual_clip * A (Ye et al. 2019).
    Rollout correction, rho = exp(old_logp - rollout_logp) (no gradient), multiplies the
    per-token loss: tis_cap gives weight clamp(rho, tis_floor, tis_cap) (TIS); icepop=(low,
    high) gives weight rho inside [low, high] and 0 outside (ICEPOP); both combine as the
    clamped weight * in-band. |logp - old_logp| is clamped at LOG_RATIO_CLAMP before exp.
    Zeroed tokens stay in the denominators of loss_agg.

    Returns (loss, metrics); metrics are detached scalars: clip_frac (tokens whose clipped
    branch is active), dual_clip_frac, ppo_kl (mean old_logp - logp), ratio_mean, ratio_max,
    and with rollout correction rollout_is_mean, tis_clip_frac and icepop_masked_frac.
    """
    _check_shapes(logp=logp, old_logp=old_logp, advantages=advantages, action_mask=action_mask)
    _check_policy_args(clip_eps_low, clip_eps_high, dual_clip, importance, loss_agg)
    mask = action_mask.bool()
    zero = torch.zeros((), dtype=logp.dtype, device=logp.device)
    # where(), not multiplication: padding may hold -inf log-probs and exp(inf) * 0 is NaN.
    log_ratio = torch.where(mask, logp - old_logp, zero).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    adv = torch.where(mask, advantages.to(logp.dtype), zero)
    ratio = _ratio(log_ratio, logp, mask, importance, zero)
    surr1 = ratio * adv
    surr2 = ratio.clamp(1.0 - clip_eps_low, 1.0 + clip_eps_high) * adv
    metrics: dict[str, torch.Tensor] = {}
    loss_tok = -_dual_clipped(torch.min(surr1, surr2), adv, mask, dual_clip, metrics)

    weight = _rollout_weight(old_logp, rollout_logp, mask, tis_cap, icepop, metrics, tis_floor)
    if weight is not None:
        loss_tok = loss_tok * weight.to(loss_tok.dtype)

    loss = aggregate_loss(loss_tok, mask, loss_agg, max_len)
    with torch.no_grad():
        metrics["clip_frac"] = masked_mean((surr2 < surr1).to(logp.dtype), mask)
        metrics["ppo_kl"] = masked_mean(-log_ratio, mask)
        metrics["ratio_mean"] = masked_mean(ratio, mask)
        # ratio > 0, so 0 at masked positions never wins unless nothing is selected.
        ratio_sel = torch.where(mask, ratio, zero)
        metrics["ratio_max"] = ratio_sel.amax() if ratio.numel() else zero.clone()
    return loss, metrics


def value_loss(
    values: torch.Tensor,  # [batch, resp_len]
    old_values: torch.Tensor,  # [batch, resp_len]
    returns: torch.Tensor,  # [batch, resp_len]
    action_mask: torch.Tensor,  # [batch, resp_len]
    clip_eps: float | None = None,
    loss_agg: str = "token_mean",
    max_len: int | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """0.5 * max((V - R)^2, (V_clipped - R)^2), V_clipped = V_old + clip(V - V_old, +-eps).

    clip_eps=None gives the plain 0.5 * (V - R)^2. Returns (loss, {"value_clip_frac"}).
    """
    _check_shapes(values=values, old_values=old_values, returns=returns, action_mask=action_mask)
    mask = action_mask.bool()
    zero = torch.zeros((), dtype=values.dtype, device=values.device)
    err = torch.where(mask, values - returns, zero)
    loss_tok = err**2
    metrics: dict[str, torch.Tensor] = {}
    if clip_eps is not None:
        if not clip_eps > 0.0:
            raise ValueError(f"value clip_eps={clip_eps} must be > 0 (or None to disable)")
        clipped = old_values + (values - old_values).clamp(-clip_eps, clip_eps)
        clipped_sq = torch.where(mask, clipped - returns, zero) ** 2
        clip_active = (clipped_sq > loss_tok).to(values.dtype)
        metrics["value_clip_frac"] = masked_mean(clip_active, mask).detach()
        loss_tok = torch.max(loss_tok, clipped_sq)
    else:
        metrics["value_clip_frac"] = zero.detach().clone()
    return 0.5 * aggregate_loss(loss_tok, mask, loss_agg, max_len), metrics


def entropy_from_logits(logits: torch.Tensor, chunk_size: int = 1024) -> torch.Tensor:
    """Entropy of softmax(logits) per position: [batch, resp_len, vocab] -> [batch, resp_len].

    Works on `chunk_size` positions at a time in float32, so the float32 softmax of the whole
    [batch, resp_len, vocab] tensor is never materialised; when gradients are needed each chunk
    is recomputed in backward (activation checkpointing) instead of being stored.
    """
    if logits.dim() != 3:
        raise ValueError(f"logits must be [batch, resp_len, vocab], got {tuple(logits.shape)}")
    batch, resp_len, vocab = logits.shape
    flat = logits.reshape(-1, vocab)
    out_dtype = torch.promote_types(logits.dtype, torch.float32)
    parts = []
    for start in range(0, flat.shape[0], chunk_size):
        chunk = flat[start : start + chunk_size]
        if chunk.requires_grad:
            parts.append(checkpoint(_entropy_chunk, chunk, use_reentrant=False))
        else:
            parts.append(_entropy_chunk(chunk))
    if not parts:
        return logits.new_zeros((batch, resp_len), dtype=out_dtype)
    return torch.cat(parts).reshape(batch, resp_len)


def _entropy_chunk(chunk: torch.Tensor) -> torch.Tensor:
    x = chunk.to(torch.promote_types(chunk.dtype, torch.float32))  # [n, vocab]
    log_z = torch.logsumexp(x, dim=-1)  # [n]
    probs = torch.softmax(x, dim=-1)
    return log_z - (probs * x).sum(dim=-1)


def _check_policy_args(clip_eps_low, clip_eps_high, dual_clip, importance, loss_agg) -> None:
    if not (0.0 <= clip_eps_low < 1.0 and clip_eps_high >= 0.0):
        raise ValueError(
            f"clip_eps_low={clip_eps_low} must be in [0, 1) and clip_eps_high={clip_eps_high} >= 0"
        )
    if dual_clip is not None and not dual_clip > 1.0:
        raise ValueError(f"dual_clip={dual_clip} must be > 1.0 (or None to disable)")
    if importance not in IMPORTANCE_LEVELS:
        valid = ", ".join(IMPORTANCE_LEVELS)
        raise ValueError(f"importance={importance!r} is unknown; valid: {valid}")
    if loss_agg not in LOSS_AGGS:
        raise ValueError(f"loss_agg={loss_agg!r} is unknown; valid: {', '.join(LOSS_AGGS)}")


def _ratio(log_ratio, logp, mask, importance: str, zero) -> torch.Tensor:
    """[batch, resp_len] PPO ratio: per token, or GSPO's sequence ratio in token form."""
    if importance == "token":
        return log_ratio.exp()
    seq_log_ratio = masked_mean(log_ratio, mask, dim=-1).unsqueeze(-1)  # [batch, 1]
    token_logp = torch.where(mask, logp, zero)
    ratio = (seq_log_ratio.detach() + token_logp - token_logp.detach()).exp()
    return torch.where(mask, ratio, torch.ones_like(ratio))


def _dual_clipped(clipped_obj, adv, mask, dual_clip, metrics) -> torch.Tensor:
    """The objective with the dual clip (for A < 0, at least dual_clip * A) when set."""
    if dual_clip is None:
        return clipped_obj
    dual_active = (adv < 0) & (dual_clip * adv > clipped_obj)
    metrics["dual_clip_frac"] = masked_mean(dual_active.to(adv.dtype), mask).detach()
    return torch.where(adv < 0, torch.max(clipped_obj, dual_clip * adv), clipped_obj)


def _rollout_weight(
    old_logp: torch.Tensor,
    rollout_logp: torch.Tensor | None,
    mask: torch.Tensor,
    tis_cap: float | None,
    icepop: tuple[float, float] | None,
    metrics: dict[str, torch.Tensor],
    tis_floor: float = 0.0,
) -> torch.Tensor | None:
    if tis_cap is None and icepop is None:
        return None
    if rollout_logp is None:
        raise ValueError("tis_cap / icepop need rollout_logp (the inference engine's log-probs)")
    if rollout_logp.shape != old_logp.shape:
        raise ValueError(
            f"rollout_logp {tuple(rollout_logp.shape)} must match old_logp {tuple(old_logp.shape)}"
        )
    with torch.no_grad():
        zero = torch.zeros((), dtype=old_logp.dtype, device=old_logp.device)
        rho = torch.where(mask, old_logp - rollout_logp, zero).exp()  # [batch, resp_len]
        weight = rho
        fdt = old_logp.dtype
        metrics["rollout_is_mean"] = masked_mean(rho, mask)
        if tis_cap is not None:
            if not 0.0 <= tis_floor <= tis_cap:
                raise ValueError(f"tis_cap={tis_cap} must be > 0 and tis_floor={tis_floor} in "
                                 "[0, tis_cap]")
            clipped = (rho > tis_cap) | (rho < tis_floor)
            metrics["tis_clip_frac"] = masked_mean(clipped.to(fdt), mask)
            weight = weight.clamp(min=tis_floor, max=tis_cap)
        if icepop is not None:
            low, high = icepop
            if not 0.0 <= low <= high:
                raise ValueError(f"icepop={icepop} must be (low, high) with 0 <= low <= high")
            in_band = (rho >= low) & (rho <= high)
            metrics["icepop_masked_frac"] = masked_mean((~in_band).to(fdt), mask)
            weight = torch.where(in_band, weight, zero)
        return weight


def _check_shapes(**tensors: torch.Tensor) -> None:
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    if len(set(shapes.values())) != 1 or len(next(iter(shapes.values()))) != 2:
        raise ValueError(f"expected equal [batch, resp_len] shapes, got {shapes}")
