"""RL math (advantages, KL, losses, filtering) and, in loop.py/experience.py, the RL loop."""
from hpc_rlhf.rl.advantages import (
    ESTIMATORS,
    compute_advantages,
    discounted_returns,
    dr_grpo_advantages,
    gae_advantages,
    global_normalize,
    grpo_advantages,
    reinforce_baseline_advantages,
    rloo_advantages,
    token_rewards,
)
from hpc_rlhf.rl.filtering import dynamic_filter_groups, overlong_penalty
from hpc_rlhf.rl.kl import (
    KL_KINDS,
    AdaptiveKLController,
    FixedKLController,
    kl_estimate,
    make_kl_controller,
)
from hpc_rlhf.rl.losses import (
    IMPORTANCE_LEVELS,
    LOSS_AGGS,
    aggregate_loss,
    entropy_from_logits,
    policy_loss,
    value_loss,
)
from hpc_rlhf.rl.masked import masked_mean, masked_sum

__all__ = [
    "ESTIMATORS",
    "IMPORTANCE_LEVELS",
    "KL_KINDS",
    "LOSS_AGGS",
    "AdaptiveKLController",
    "FixedKLController",
    "aggregate_loss",
    "compute_advantages",
    "discounted_returns",
    "dr_grpo_advantages",
    "dynamic_filter_groups",
    "entropy_from_logits",
    "gae_advantages",
    "global_normalize",
    "grpo_advantages",
    "kl_estimate",
    "make_kl_controller",
    "masked_mean",
    "masked_sum",
    "overlong_penalty",
    "policy_loss",
    "reinforce_baseline_advantages",
    "rloo_advantages",
    "token_rewards",
    "value_loss",
]
