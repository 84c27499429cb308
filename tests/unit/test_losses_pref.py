"""Losses vs naive per-sample references (float64 loops; tolerance 1e-6 relative in float32)."""
from __future__ import annotations

import math

import pytest
import torch

from hpc_rlhf.algos.losses_pref import (bradley_terry_loss, kd_forward_kl, kto_loss, prm_loss,
                                        preference_loss)
from hpc_rlhf.algos.losses_sft import sft_loss

pytestmark = pytest.mark.unit
TOL = dict(rtol=1e-5, atol=1e-6)


def _logsig(x):
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


@pytest.mark.parametrize("loss_type,eps", [("dpo", 0.0), ("cdpo", 0.2), ("ipo", 0.0)])
def test_preference_losses_match_naive(loss_type, eps):
    g = torch.Generator().manual_seed(0)
    pc, pr, rc, rr = (torch.randn(7, generator=g) * 5 for _ in range(4))
    beta = 0.3
    loss, rew_c, rew_r = preference_loss(pc, pr, rc, rr, beta=beta, loss_type=loss_type,
                                         label_smoothing=eps)
    ref = []
    for i in range(7):
        h = (pc[i].item() - rc[i].item()) - (pr[i].item() - rr[i].item())
        if loss_type == "ipo":
            ref.append((h - 1 / (2 * beta)) ** 2)
        else:
            ref.append(-(1 - eps) * _logsig(beta * h) - eps * _logsig(-beta * h))
    assert torch.allclose(loss, torch.tensor(sum(ref) / 7), **TOL)
    assert torch.allclose(rew_c - rew_r, beta * ((pc - rc) - (pr - rr)), **TOL)


def test_dpo_gradient_pushes_chosen_up():
    pc = torch.zeros(3, requires_grad=True)
    pr = torch.zeros(3, requires_grad=True)
    loss, _, _ = preference_loss(pc, pr, torch.zeros(3), torch.zeros(3), beta=0.1)
    loss.backward()
    assert (pc.grad < 0).all() and (pr.grad > 0).all()   # descent raises chosen, lowers rejected


def test_kto_matches_naive():
    g = torch.Generator().manual_seed(1)
    pol, ref = torch.randn(8, generator=g), torch.randn(8, generator=g)
    good = torch.tensor([1, 0, 1, 1, 0, 0, 1, 0], dtype=torch.bool)
    beta, z0, wd, wu = 0.5, 0.3, 1.0, 1.5
    out = kto_loss(pol, ref, good, z0, beta=beta, desirable_weight=wd, undesirable_weight=wu)
    sig = lambda x: 1 / (1 + math.exp(-x))
    ref_losses = [wd * (1 - sig(beta * (p - r - z0))) if d else wu * (1 - sig(beta * (z0 - p + r)))
                  for p, r, d in zip(pol.tolist(), ref.tolist(), good.tolist())]
    assert torch.allclose(out, torch.tensor(sum(ref_losses) / 8), **TOL)
    # a negative KL estimate is clamped to 0
    assert torch.allclose(kto_loss(pol, ref, good, -1.0, beta=beta),
                          kto_loss(pol, ref, good, 0.0, beta=beta))


def test_bradley_terry_with_margin_matches_naive():
    c, r, m = torch.tensor([1.0, -2.0, 0.5]), torch.tensor([0.0, 1.0, 0.5]), torch.tensor([0.5, 0, 1])
    ref = sum(-_logsig(ci - ri - mi) for ci, ri, mi in zip(c.tolist(), r.tolist(), m.tolist())) / 3
    assert torch.allclose(bradley_terry_loss(c, r, m), torch.tensor(ref), **TOL)
    assert bradley_terry_loss(c, r, m) > bradley_terry_loss(c, r)      # margin makes it harder


def test_prm_loss_is_step_cross_entropy():
    logits = torch.tensor([[2.0, -1.0], [0.0, 3.0], [1.0, 1.0]])
    labels = torch.tensor([0, 1, 1])
    ref = 0.0
    for row, lab in zip(logits.tolist(), labels.tolist()):
        ref += -(row[lab] - math.log(sum(math.exp(x) for x in row)))
    assert torch.allclose(prm_loss(logits, labels), torch.tensor(ref / 3), **TOL)


def test_kd_forward_kl_matches_naive():
    g = torch.Generator().manual_seed(2)
    s, t = torch.randn(2, 3, 5, generator=g), torch.randn(2, 3, 5, generator=g)
    mask = torch.tensor([[1, 1, 0], [0, 1, 1]])
    total, n = 0.0, 0
    for b in range(2):
        for j in range(3):
            if not mask[b, j]:
                continue
            ps = torch.softmax(s[b, j].double(), -1)
            pt = torch.softmax(t[b, j].double(), -1)
            total += float((pt * (pt.log() - ps.log())).sum())
            n += 1
    assert torch.allclose(kd_forward_kl(s, t, mask), torch.tensor(total / n, dtype=torch.float32),
                          **TOL)
    assert kd_forward_kl(t, t, mask).abs() < 1e-6


def test_sft_loss_is_masked_token_nll():
    lp = torch.tensor([[-1.0, -2.0, -3.0], [-4.0, -5.0, -6.0]])
    mask = torch.tensor([[0, 1, 1], [0, 0, 1]])
    assert torch.allclose(sft_loss(lp, mask), torch.tensor((2 + 3 + 6) / 3))
