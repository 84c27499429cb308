"""KL estimators vs per-element math, and the KL coefficient controllers vs the PPO formula."""
import math

import pytest
import torch

from hpc_rlhf.algos.kl import (
    AdaptiveKLController,
    FixedKLController,
    kl_estimate,
    make_kl_controller,
)

pytestmark = pytest.mark.unit

ATOL = {torch.float32: 1e-5, torch.float64: 1e-10}


def naive_kl(logp, ref, kind, clamp=10.0):
    out = []
    for a, b in zip(logp.flatten().tolist(), ref.flatten().tolist()):
        if kind == "k1":
            v = a - b
        elif kind == "k2":
            v = (a - b) ** 2 / 2
        else:
            r = b - a
            v = math.exp(r) - 1 - r if r < 700 else math.inf
        out.append(min(max(v, -clamp), clamp) if clamp is not None else v)
    return torch.tensor(out, dtype=torch.float64).reshape(logp.shape)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kind", ["k1", "k2", "k3"])
def test_kl_estimate_matches_naive(dtype, kind):
    gen = torch.Generator().manual_seed(0)
    logp = -torch.rand(5, 7, generator=gen, dtype=dtype) * 3
    ref = logp + torch.randn(5, 7, generator=gen, dtype=dtype) * 0.5
    ref[0, :3] = torch.tensor([-20.0, 5.0, 3.0], dtype=dtype) + logp[0, :3]  # hit the clamp
    out = kl_estimate(logp, ref, kind)
    torch.testing.assert_close(out.double(), naive_kl(logp, ref, kind), atol=ATOL[dtype], rtol=1e-6)
    unclamped = kl_estimate(logp, ref, kind, clamp=None)
    torch.testing.assert_close(
        unclamped.double(), naive_kl(logp, ref, kind, None), atol=ATOL[dtype], rtol=1e-6
    )


def test_kl_estimate_properties():
    logp = torch.tensor([[-1.0, -2.0, -0.5, -50.0]], dtype=torch.float64)
    ref = torch.tensor([[-1.0, -1.0, -3.0, -0.01]], dtype=torch.float64)
    assert (kl_estimate(logp, ref, "k3") >= 0).all() and (kl_estimate(logp, ref, "k2") >= 0).all()
    assert kl_estimate(logp, ref, "k3")[0, 0] == 0.0
    assert kl_estimate(logp, ref, "k3")[0, 3] == 10.0  # exp(50) clamped, not inf/NaN
    # bf16 inputs are computed in float32.
    assert kl_estimate(logp.bfloat16(), ref.bfloat16(), "k1").dtype == torch.float32


def test_kl_estimate_gradient_of_k3():
    logp = torch.tensor([-1.0, -0.3, -2.0], dtype=torch.float64, requires_grad=True)
    ref = torch.tensor([-1.2, -0.1, -2.5], dtype=torch.float64)
    kl_estimate(logp, ref, "k3").sum().backward()
    # d/dlogp [exp(ref - logp) - 1 - (ref - logp)] = 1 - exp(ref - logp)
    expected = [1 - math.exp(b - a) for a, b in zip(logp.tolist(), ref.tolist())]
    torch.testing.assert_close(logp.grad, torch.tensor(expected, dtype=torch.float64), atol=1e-12, rtol=0)


def test_kl_estimate_rejects_unknown_kind():
    with pytest.raises(ValueError, match="k1, k2, k3"):
        kl_estimate(torch.zeros(2), torch.zeros(2), "k4")


def test_adaptive_controller_matches_ppo_formula():
    ctl = AdaptiveKLController(init_kl_coef=0.1, target=6.0, horizon=10000)
    expected = 0.1
    for kl, n_steps in [(12.0, 512), (6.0, 512), (1.0, 256), (6.6, 1024), (5.7, 128)]:
        err = min(max(kl / 6.0 - 1, -0.2), 0.2)
        expected *= 1 + err * n_steps / 10000
        assert ctl.update(kl, n_steps) == pytest.approx(expected, rel=1e-12)
        assert ctl.value == pytest.approx(expected, rel=1e-12)
    assert ctl.value != 0.1


def test_fixed_controller_and_factory():
    ctl = FixedKLController(0.05)
    assert ctl.update(100.0, 1000) == 0.05 and ctl.value == 0.05
    assert isinstance(make_kl_controller(0.05), FixedKLController)
    assert isinstance(make_kl_controller(0.05, target=1.0), AdaptiveKLController)
    with pytest.raises(ValueError, match="target"):
        AdaptiveKLController(0.1, target=0.0, horizon=100)
    with pytest.raises(ValueError, match="init_kl_coef"):
        AdaptiveKLController(0.0, target=1.0, horizon=100)
    with pytest.raises(ValueError, match="kl_coef"):
        FixedKLController(-1.0)
