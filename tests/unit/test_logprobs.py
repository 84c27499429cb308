"""logprobs / entropy utilities against naive per-token loops."""
import math

import pytest
import torch

from hpc_rlhf.engine.logprobs import (entropy_from_logits, logprobs_from_logits,
                                      position_ids_from_mask, response_logprobs)

pytestmark = pytest.mark.unit


def naive_logprob(logits, labels, temperature=1.0):
    b, t, _ = logits.shape
    out = torch.zeros(b, t, dtype=torch.float64)
    for i in range(b):
        for j in range(t):
            row = logits[i, j].double() / temperature
            out[i, j] = row[labels[i, j]] - math.log(sum(math.exp(x) for x in row.tolist()))
    return out


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("chunk_rows", [1, 3, 1024])
def test_logprobs_match_naive_loop(temperature, chunk_rows):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 11, generator=g) * 3
    labels = torch.randint(0, 11, (2, 5), generator=g)
    got = logprobs_from_logits(logits, labels, temperature, chunk_rows=chunk_rows)
    assert got.shape == (2, 5) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), naive_logprob(logits, labels, temperature),
                               atol=1e-5, rtol=0)


def test_bf16_logits_upcast():
    g = torch.Generator().manual_seed(1)
    logits = (torch.randn(3, 4, 50, generator=g) * 5).bfloat16()
    labels = torch.randint(0, 50, (3, 4), generator=g)
    got = logprobs_from_logits(logits, labels)
    torch.testing.assert_close(got.double(), naive_logprob(logits.float(), labels), atol=1e-5, rtol=0)


def test_entropy_matches_naive():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(2, 3, 7, generator=g) * 2
    got = entropy_from_logits(logits, temperature=0.5, chunk_rows=2)
    for i in range(2):
        for j in range(3):
            p = [math.exp(x) for x in (logits[i, j].double() / 0.5).tolist()]
            z = sum(p)
            h = -sum(q / z * math.log(q / z) for q in p)
            assert abs(got[i, j].item() - h) < 1e-5


def test_bad_args_raise():
    with pytest.raises(ValueError, match="temperature"):
        logprobs_from_logits(torch.zeros(1, 2, 3), torch.zeros(1, 2, dtype=torch.long), 0.0)
    with pytest.raises(ValueError, match="labels shape"):
        logprobs_from_logits(torch.zeros(1, 2, 3), torch.zeros(1, 3, dtype=torch.long))


def test_position_ids_left_padded():
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    assert position_ids_from_mask(mask).tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 3, 4]]


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory):
    from transformers import AutoModelForCausalLM

    from hpc_rlhf.models.tiny import ensure_tiny_model
    path = ensure_tiny_model(tmp_path_factory.mktemp("tiny"))
    return AutoModelForCausalLM.from_pretrained(path).eval()


def test_response_logprobs_left_padded_matches_unpadded_loop(tiny_lm):
    """Each row of a left-padded batch equals running that row alone without padding."""
    rows = [[5, 9, 30, 31, 40, 41], [7, 8, 50, 51]]           # prompt + 2..4 response tokens
    response_len = 3
    seq = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), seq, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, seq - len(r):] = torch.tensor(r)
        mask[i, seq - len(r):] = 1
    with torch.no_grad():
        got, ent = response_logprobs(tiny_lm, ids, mask, response_len, temperature=0.9,
                                     with_entropy=True)
        assert got.shape == ent.shape == (2, response_len)
        for i, r in enumerate(rows):
            logits = tiny_lm(torch.tensor([r])).logits[0].double() / 0.9   # [len, v]
            for k in range(response_len):
                pos = len(r) - response_len + k                  # token being predicted
                want = torch.log_softmax(logits[pos - 1], -1)[r[pos]]
                assert abs(got[i, k].item() - want.item()) < 1e-4, (i, k)
                p = torch.softmax(logits[pos - 1], -1)
                want_h = -(p * p.log()).sum()
                assert abs(ent[i, k].item() - want_h.item()) < 1e-4


def test_response_len_validated(tiny_lm):
    ids = torch.ones(1, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="response_len=4"):
        response_logprobs(tiny_lm, ids, torch.ones_like(ids), 4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("temperature,chunk_rows", [(1.0, 1024), (0.7, 3), (1.3, 5)])
def test_fused_logprobs_and_entropy_match_separate_functions_with_gradient(dtype, temperature,
                                                                           chunk_rows):
    from hpc_rlhf.engine.logprobs import logprobs_and_entropy
    g = torch.Generator().manual_seed(7)
    full = (torch.randn(3, 9, 50, generator=g) * 3).to(dtype)
    labels = torch.randint(0, 50, (3, 7), generator=g)
    weights = torch.randn(3, 7, generator=g)

    def run(fused):
        x = full.clone().requires_grad_(True)
        logits = x[:, 1:-1]                        # a non-contiguous slice, as in the RL step
        if fused:
            lp, ent = logprobs_and_entropy(logits, labels, temperature, chunk_rows=chunk_rows)
        else:
            lp = logprobs_from_logits(logits, labels, temperature, chunk_rows=chunk_rows)
            with torch.no_grad():
                ent = entropy_from_logits(logits.detach(), temperature)
        (lp * weights).sum().backward()
        return lp, ent, x.grad, x.detach()

    lp_f, ent_f, grad_f, x_f = run(True)
    lp_r, ent_r, grad_r, _ = run(False)
    assert lp_f.dtype == ent_f.dtype == torch.float32 and not ent_f.requires_grad
    torch.testing.assert_close(lp_f, lp_r, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ent_f, ent_r, rtol=1e-5, atol=1e-5)
    tol = 1e-6 if dtype == torch.float32 else 1e-2   # bf16 grads: one rounding either way
    torch.testing.assert_close(grad_f.float(), grad_r.float(), rtol=tol, atol=tol)
    assert grad_f.dtype == dtype and torch.equal(x_f, full)     # the input is not modified
    # a naive float64 reference of the gradient: (onehot - p) * w / T at the sliced positions
    z = full[:, 1:-1].double() / temperature
    p = torch.softmax(z, -1)
    onehot = torch.nn.functional.one_hot(labels, 50).double()
    want = torch.zeros_like(full, dtype=torch.float64)
    want[:, 1:-1] = (onehot - p) * weights.double()[..., None] / temperature
    torch.testing.assert_close(grad_f.double(), want, rtol=tol, atol=tol * 10)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_logprobs_at_without_entropy_equal_the_entropy_path(dtype, temperature):
    """with_entropy=False (reference / old-policy forwards) skips the entropy pass only: the same
    log p and gradient at repeated positions, no entropy returned, the input untouched."""
    from hpc_rlhf.engine.logprobs import logprobs_and_entropy_at
    g = torch.Generator().manual_seed(3)
    full = (torch.randn(11, 40, generator=g) * 3).to(dtype)
    pos = torch.tensor([0, 0, 2, 5, 5, 5, 10])
    labels = torch.randint(0, 40, (7,), generator=g)
    weights = torch.randn(7, generator=g)

    def run(with_entropy):
        x = full.clone().requires_grad_(True)
        lp, ent = logprobs_and_entropy_at(x, pos, labels, temperature, chunk_rows=4,
                                          with_entropy=with_entropy)
        (lp * weights).sum().backward()
        return lp.detach(), ent, x.grad

    lp_e, ent_e, grad_e = run(True)
    lp_n, ent_n, grad_n = run(False)
    assert ent_n is None and ent_e.shape == (7,)
    torch.testing.assert_close(lp_n, lp_e, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grad_n.float(), grad_e.float(), rtol=1e-6, atol=1e-6)
    want = torch.log_softmax(full.double() / temperature, -1)[pos, labels]
    torch.testing.assert_close(lp_n.double(), want, rtol=1e-5, atol=1e-5 if dtype == torch.float32
                               else 1e-2)
