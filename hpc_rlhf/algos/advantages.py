"""Advantage estimators: GAE, REINFORCE returns and the group baselines (GRPO & co).

Conventions
- Token tensors are [batch, resp_len] with `action_mask` 1 on response tokens and 0 on padding
  and env-feedback tokens. Masked positions are *skipped*, not treated as zero-reward steps:
  the discount and the GAE recursion run over the action tokens of a row only (a turn of env
  feedback between two assistant turns does not cost a factor gamma and its value is never
  read). Outputs are exactly 0 at masked positions.
- Sequence rewards are [batch]; a group is `n` consecutive rows (batch = n_prompts * n).
- A sequence reward is placed on the *last* response token of its row. The KL penalty enters
  per token: r_tok[t] = reward * [t == last] - kl_coef * kl[t] on action tokens.
- No gradient flows through anything here (advantages and returns are targets).
"""
from __future__ import annotations

import torch

from hpc_rlhf.algos.masked import last_token_index, masked_mean

ESTIMATORS = ("gae", "reinforce", "reinforce_baseline", "grpo", "dr_grpo", "rloo")
GROUP_ESTIMATORS = ("reinforce_baseline", "grpo", "dr_grpo", "rloo")
# REINFORCE++ (and OpenRLHF's PPO) whiten advantages over the whole batch; the group-normalised
# estimators already have a per-prompt scale and are left alone.
NORMALIZED_BY_DEFAULT = ("gae", "reinforce", "reinforce_baseline")


@torch.no_grad()
def gae_advantages(
    rewards_tok: torch.Tensor,  # [batch, resp_len]
    values: torch.Tensor,  # [batch, resp_len]
    action_mask: torch.Tensor,  # [batch, resp_len]
    gamma: float,
    lam: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over the action tokens of each row.

    delta_k = r_k + gamma * V_{k+1} - V_k and A_k = delta_k + gamma * lam * A_{k+1}, where k
    runs over the action tokens of a row, V after the last one is 0 (the episode ends) and
    rewards/values at masked positions are ignored. Returns (advantages, returns = A + V), both
    [batch, resp_len] and 0 at masked positions.
    """
    _check_same_shape(rewards_tok=rewards_tok, values=values, action_mask=action_mask)
    mask = action_mask.bool()
    dtype = torch.promote_types(rewards_tok.dtype, values.dtype)
    rewards_tok, values = rewards_tok.to(dtype), values.to(dtype)
    batch, resp_len = rewards_tok.shape
    advantages = torch.zeros_like(rewards_tok)
    last_gae = rewards_tok.new_zeros(batch)  # A of the next action token
    next_value = rewards_tok.new_zeros(batch)  # V of the next action token (0 past the end)
    for t in reversed(range(resp_len)):
        m = mask[:, t]
        delta = rewards_tok[:, t] + gamma * next_value - values[:, t]
        gae = delta + gamma * lam * last_gae
        last_gae = torch.where(m, gae, last_gae)
        next_value = torch.where(m, values[:, t], next_value)
        advantages[:, t] = torch.where(m, gae, 0.0)
    returns = torch.where(mask, advantages + values, 0.0)
    return advantages, returns


@torch.no_grad()
def discounted_returns(
    rewards_tok: torch.Tensor,  # [batch, resp_len]
    action_mask: torch.Tensor,  # [batch, resp_len]
    gamma: float,
) -> torch.Tensor:
    """REINFORCE returns G_k = sum_{j>=k} gamma^(j-k) r_j over the action tokens of a row.

    Equal to gae_advantages with values = 0 and lam = 1. Returns [batch, resp_len], 0 at
    masked positions.
    """
    _check_same_shape(rewards_tok=rewards_tok, action_mask=action_mask)
    mask = action_mask.bool()
    if gamma == 1.0:
        # Undiscounted: a reverse cumulative sum (one kernel instead of resp_len steps).
        r = torch.where(mask, rewards_tok, 0.0)
        return torch.where(mask, r.flip(1).cumsum(1).flip(1), 0.0)
    returns = torch.zeros_like(rewards_tok)
    running = rewards_tok.new_zeros(rewards_tok.shape[0])
    for t in reversed(range(rewards_tok.shape[1])):
        m = mask[:, t]
        running = torch.where(m, rewards_tok[:, t] + gamma * running, running)
        returns[:, t] = torch.where(m, running, 0.0)
    return returns


def token_rewards(
    rewards: torch.Tensor,  # [batch]
    action_mask: torch.Tensor,  # [batch, resp_len]
    kl: torch.Tensor | None = None,  # [batch, resp_len]
    kl_coef: float = 0.0,
) -> torch.Tensor:
    """Per-token rewards: the sequence reward on the last response token, minus kl_coef * kl.

    Returns [batch, resp_len], 0 at masked positions. A row with no response token gets no
    reward (there is no action to credit).
    """
    _check_rewards(rewards, action_mask)
    mask = action_mask.bool()
    dtype = torch.promote_types(rewards.dtype, torch.float32)
    if kl is not None:
        _check_same_shape(kl=kl, action_mask=action_mask)
        dtype = torch.promote_types(dtype, kl.dtype)
    idx, has_any = last_token_index(mask)
    out = torch.zeros(mask.shape, dtype=dtype, device=rewards.device)
    src = torch.where(has_any, rewards.to(dtype), 0.0)
    out.scatter_(1, idx.unsqueeze(1), src.unsqueeze(1))
    if kl is not None and kl_coef != 0.0:
        out = out - kl_coef * torch.where(mask, kl.to(dtype), 0.0)
    return torch.where(mask, out, 0.0)


def grpo_advantages(rewards: torch.Tensor, n: int, eps: float = 1e-6) -> torch.Tensor:
    """GRPO: (r - group mean) / (group std + eps), std unbiased (n - 1). [batch] -> [batch].

    A group whose rewards are all equal gets exactly 0 (not rounding noise / eps).
    """
    groups = _groups(rewards, n, "grpo_advantages", min_n=2)  # [n_prompts, n]
    centered = groups - groups.mean(dim=1, keepdim=True)
    adv = centered / (groups.std(dim=1, keepdim=True) + eps)
    return _zero_flat_groups(adv, groups).reshape(-1)


def dr_grpo_advantages(rewards: torch.Tensor, n: int) -> torch.Tensor:
    """Dr. GRPO: r - group mean (no division by the std). [batch] -> [batch]."""
    groups = _groups(rewards, n, "dr_grpo_advantages", min_n=1)
    adv = groups - groups.mean(dim=1, keepdim=True)
    return _zero_flat_groups(adv, groups).reshape(-1)


def reinforce_baseline_advantages(rewards: torch.Tensor, n: int) -> torch.Tensor:
    """REINFORCE++-baseline: r - group mean; the batch whitening is `global_normalize`."""
    groups = _groups(rewards, n, "reinforce_baseline_advantages", min_n=1)
    adv = groups - groups.mean(dim=1, keepdim=True)
    return _zero_flat_groups(adv, groups).reshape(-1)


def rloo_advantages(rewards: torch.Tensor, n: int) -> torch.Tensor:
    """RLOO: r_i - mean of the other n - 1 rewards of the group. [batch] -> [batch]."""
    groups = _groups(rewards, n, "rloo_advantages", min_n=2)
    baseline = (groups.sum(dim=1, keepdim=True) - groups) / (n - 1)
    return _zero_flat_groups(groups - baseline, groups).reshape(-1)


def global_normalize(
    adv_tok: torch.Tensor,  # [batch, resp_len]
    action_mask: torch.Tensor,  # [batch, resp_len]
    std: bool = True,
    eps: float = 1e-8,
) -> torch.Tensor:
    """Whiten advantages over all action tokens of the batch (REINFORCE++).

    (a - mean) / sqrt(max(var, eps)) with the population variance over masked tokens; with
    std=False only the mean is removed. Masked positions are 0; an all-masked batch gives 0.
    Under data parallelism call it on the gathered batch: the statistics are batch-wide.
    """
    _check_same_shape(adv_tok=adv_tok, action_mask=action_mask)
    mask = action_mask.bool()
    mean = masked_mean(adv_tok, mask)
    centered = adv_tok - mean
    if std:
        var = masked_mean(centered**2, mask)
        centered = centered * var.clamp(min=eps).rsqrt()
    return torch.where(mask, centered, 0.0)


@torch.no_grad()
def compute_advantages(
    estimator: str,
    rewards: torch.Tensor,  # [batch] sequence rewards
    action_mask: torch.Tensor,  # [batch, resp_len]
    *,
    n_samples_per_prompt: int = 1,
    values: torch.Tensor | None = None,  # [batch, resp_len], estimator "gae" only
    kl: torch.Tensor | None = None,  # [batch, resp_len] token KL estimate (kl_estimate)
    kl_coef: float = 0.0,
    gamma: float = 1.0,
    lam: float = 1.0,
    normalize: bool | None = None,
    std_normalize: bool = True,
    reward_clip: tuple[float, float] | None = None,
    grpo_eps: float = 1e-6,
    clip_after_baseline: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-level (advantages, returns), both [batch, resp_len] and 0 at masked positions.

    Steps: clip sequence rewards to `reward_clip` (after the baseline instead with
    clip_after_baseline, as OpenRLHF's compute_reward does); subtract the group baseline of the
    estimator ("grpo": mean/std, "dr_grpo" and "reinforce_baseline": mean, "rloo":
    leave-one-out mean; "gae" and "reinforce": none); place the result on the last response
    token and subtract kl_coef * kl per token (`token_rewards`); then "gae" runs GAE with the
    critic's `values`, every other estimator uses discounted returns as advantages. Finally
    advantages are whitened over the batch (`global_normalize`, std only if std_normalize)
    when `normalize` is True; None means the estimator's default (on for gae, reinforce and
    reinforce_baseline, off for grpo, dr_grpo and rloo). Returns are never normalised.
    """
    _check_advantage_args(estimator, values, gamma, kl_coef, kl, reward_clip)
    _check_rewards(rewards, action_mask)
    if reward_clip is not None and not clip_after_baseline:
        rewards = rewards.clamp(min=reward_clip[0], max=reward_clip[1])

    n = n_samples_per_prompt
    if estimator == "grpo":
        shaped = grpo_advantages(rewards, n, grpo_eps)
    elif estimator == "dr_grpo":
        shaped = dr_grpo_advantages(rewards, n)
    elif estimator == "reinforce_baseline":
        shaped = reinforce_baseline_advantages(rewards, n)
    elif estimator == "rloo":
        shaped = rloo_advantages(rewards, n)
    else:
        shaped = rewards
    if reward_clip is not None and clip_after_baseline:
        shaped = shaped.clamp(min=reward_clip[0], max=reward_clip[1])

    r_tok = token_rewards(shaped, action_mask, kl, kl_coef)  # [batch, resp_len]
    if estimator == "gae":
        advantages, returns = gae_advantages(r_tok, values, action_mask, gamma, lam)
    else:
        returns = discounted_returns(r_tok, action_mask, gamma)
        advantages = returns.clone()

    if normalize is None:
        normalize = estimator in NORMALIZED_BY_DEFAULT
    if normalize:
        advantages = global_normalize(advantages, action_mask, std=std_normalize)
    return advantages, returns


def _check_advantage_args(estimator, values, gamma, kl_coef, kl, reward_clip) -> None:
    if estimator not in ESTIMATORS:
        raise ValueError(
            f"advantage estimator={estimator!r} is unknown; "
            f"valid estimators: {', '.join(ESTIMATORS)}"
        )
    if estimator == "gae" and values is None:
        raise ValueError(
            "estimator='gae' needs values [batch, resp_len] from a critic; pass values="
        )
    if estimator != "gae" and values is not None:
        raise ValueError(
            f"values were given but estimator={estimator!r} does not use a critic; "
            "use estimator='gae' or drop the critic"
        )
    if estimator in GROUP_ESTIMATORS and gamma != 1.0:
        raise ValueError(
            f"gamma={gamma} with estimator={estimator!r}: group baselines compare whole-sequence "
            "rewards and need gamma=1.0; set gamma=1.0"
        )
    if kl_coef != 0.0 and kl is None:
        raise ValueError(f"kl_coef={kl_coef} needs the token KL tensor kl=[batch, resp_len]")
    if reward_clip is not None and reward_clip[0] > reward_clip[1]:
        raise ValueError(f"reward_clip={reward_clip} must be (low, high) with low <= high")


def _groups(rewards: torch.Tensor, n: int, fn: str, min_n: int) -> torch.Tensor:
    if rewards.dim() != 1:
        raise ValueError(f"{fn}: rewards must be [batch], got shape {tuple(rewards.shape)}")
    if n < min_n:
        raise ValueError(f"{fn}: n_samples_per_prompt={n} must be >= {min_n}")
    if rewards.shape[0] % n != 0:
        raise ValueError(
            f"{fn}: n_samples_per_prompt={n} must divide batch={rewards.shape[0]} "
            "(groups are n consecutive rows)"
        )
    return rewards.to(torch.promote_types(rewards.dtype, torch.float32)).reshape(-1, n)


def _zero_flat_groups(adv: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    # mean() of n equal floats need not equal them (rounding); a flat group has no signal.
    flat = groups.amax(dim=1, keepdim=True) == groups.amin(dim=1, keepdim=True)
    return torch.where(flat, torch.zeros_like(adv), adv)


def _check_rewards(rewards: torch.Tensor, action_mask: torch.Tensor) -> None:
    if rewards.dim() != 1 or action_mask.dim() != 2 or rewards.shape[0] != action_mask.shape[0]:
        raise ValueError(
            f"rewards must be [batch] and action_mask [batch, resp_len]; got "
            f"{tuple(rewards.shape)} and {tuple(action_mask.shape)}"
        )


def _check_same_shape(**tensors: torch.Tensor) -> None:
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    if len(set(shapes.values())) != 1 or len(next(iter(shapes.values()))) != 2:
        raise ValueError(f"expected equal [batch, resp_len] shapes, got {shapes}")
