"""Preference, reward-model and distillation losses: pure functions of tensors.

Sequence log-probabilities (`*_logps`) are sums over a response's tokens: [n] float32.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

PREFERENCE_LOSSES = ("dpo", "ipo", "cdpo")


def preference_loss(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
                    ref_chosen_logps: torch.Tensor, ref_rejected_logps: torch.Tensor, *,
                    beta: float, loss_type: str = "dpo", label_smoothing: float = 0.0):
    """DPO / IPO / cDPO over n pairs -> (loss, chosen_rewards [n], rejected_rewards [n]).

    h = (log pi(y_w) - log ref(y_w)) - (log pi(y_l) - log ref(y_l)):
      dpo / cdpo: -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h)   (eps = label
                  smoothing: cDPO, the chosen label is wrong with probability eps; 0 = DPO)
      ipo:        (h - 1 / (2 beta))^2
    Rewards are beta * (log pi - log ref), detached (for margins and accuracy).
    """
    if loss_type not in PREFERENCE_LOSSES:
        raise ValueError(f"train.preference_loss={loss_type!r} must be one of {PREFERENCE_LOSSES}")
    chosen_ratio = policy_chosen_logps - ref_chosen_logps          # [n]
    rejected_ratio = policy_rejected_logps - ref_rejected_logps    # [n]
    h = chosen_ratio - rejected_ratio                              # [n]
    if loss_type == "ipo":
        losses = (h - 1.0 / (2.0 * beta)) ** 2
    else:
        losses = (-(1.0 - label_smoothing) * F.logsigmoid(beta * h)
                  - label_smoothing * F.logsigmoid(-beta * h))
    return losses.mean(), beta * chosen_ratio.detach(), beta * rejected_ratio.detach()


def kto_loss(policy_logps: torch.Tensor, ref_logps: torch.Tensor, desirable: torch.Tensor,
             kl_ref: torch.Tensor | float, *, beta: float, desirable_weight: float = 1.0,
             undesirable_weight: float = 1.0) -> torch.Tensor:
    """KTO over n unpaired samples (mean of the per-sample losses).

    r = log pi(y|x) - log ref(y|x); z0 = kl_ref (a detached, >= 0 estimate of KL(pi || ref),
    from mismatched prompt/response pairs):
      desirable:   w_d * (1 - sigmoid(beta (r - z0)))
      undesirable: w_u * (1 - sigmoid(beta (z0 - r)))
    """
    z0 = torch.as_tensor(kl_ref, dtype=policy_logps.dtype, device=policy_logps.device)
    z0 = z0.detach().clamp(min=0)
    r = policy_logps - ref_logps                                   # [n]
    good = desirable_weight * (1 - torch.sigmoid(beta * (r - z0)))
    bad = undesirable_weight * (1 - torch.sigmoid(beta * (z0 - r)))
    return torch.where(desirable.bool(), good, bad).mean()


def bradley_terry_loss(chosen_scores: torch.Tensor, rejected_scores: torch.Tensor,
                       margin: torch.Tensor | None = None) -> torch.Tensor:
    """Reward-model pair loss: mean of -log sigmoid(s_w - s_l - margin); scores: [n]."""
    diff = chosen_scores - rejected_scores
    if margin is not None:
        diff = diff - margin
    return -F.logsigmoid(diff).mean()


def prm_loss(step_logits: torch.Tensor, step_labels: torch.Tensor) -> torch.Tensor:
    """Process-reward loss: cross-entropy of each step's label.

    step_logits: [k, 2] logits of (bad, good) read at the k step placeholders;
    step_labels: [k] int64 in {0, 1}, or [k] float P(good) (soft labels: the cross-entropy
    against (1 - p, p)).
    """
    if step_labels.is_floating_point():
        target = torch.stack([1.0 - step_labels.float(), step_labels.float()], dim=-1)
        return F.cross_entropy(step_logits.float(), target)
    return F.cross_entropy(step_logits.float(), step_labels)


def kd_forward_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                  mask: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Forward KL(teacher || student) per token, averaged over mask tokens.

    student_logits, teacher_logits: [b, T, v] predicting the same tokens; mask: [b, T].
    KL = sum_v p_t (log p_t - log p_s); its gradient equals that of the cross-entropy
    -sum_v p_t log p_s (the teacher's entropy is a constant). Vocabulary entries the teacher
    gives probability 0 (a -inf logit: masked or banned tokens) add 0, as 0 log 0 = 0; padding
    outside `mask` never reaches the mean, whatever its logits.
    """
    log_ps = F.log_softmax(student_logits.float() / temperature, dim=-1)   # [b, T, v]
    log_pt = F.log_softmax(teacher_logits.float() / temperature, dim=-1)   # [b, T, v]
    p_t = log_pt.exp()
    kl = torch.where(p_t > 0, p_t * (log_pt - log_ps), torch.zeros_like(p_t)).sum(-1)  # [b, T]
    keep = mask.bool()
    kl = torch.where(keep, kl, torch.zeros_like(kl))
    return kl.sum() / keep.sum().clamp(min=1).to(kl.dtype)
