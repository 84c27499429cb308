"""Pure math of every recipe: advantages, KL, policy/value losses, DAPO filtering, masked
reductions (re-exported here), and the preference / reward-model / distillation / SFT token
losses (losses_pref, losses_sft). Side-effect free; imports only torch."""
from hpc_rlhf.algos.advantages import (
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
from hpc_rlhf.algos.filtering import dynamic_filter_groups, overlong_penalty
from hpc_rlhf.algos.kl import (
    KL_KINDS,
    AdaptiveKLController,
    FixedKLController,
    kl_estimate,
    make_kl_controller,
)
from hpc_rlhf.algos.losses import (
    IMPORTANCE_LEVELS,
    LOSS_AGGS,
    aggregate_loss,
    entropy_from_logits,
    policy_loss,
    value_loss,
)
from hpc_rlhf.algos.masked import masked_mean, masked_sum

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
