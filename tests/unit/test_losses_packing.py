"""Packed and padded batches give the same losses and gradients on the tiny Llama (sdpa, CPU).

Tolerance: 1e-5 relative on losses and 1e-4 relative on gradient norms / 1e-5 absolute on
gradient entries (float32; the packed forward sums in a different order).
"""
from __future__ import annotations

import pytest
import torch

from hpc_rlhf.algos.losses_pref import preference_loss
from hpc_rlhf.algos.losses_sft import sft_loss
from hpc_rlhf.data import PairSample, SFTSample, pair_batch, segment_sum, sft_batch
from hpc_rlhf.engine.logprobs import token_logprobs

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    from transformers import AutoModelForCausalLM

    from hpc_rlhf.models.tiny import build_tiny_model
    path = build_tiny_model(tmp_path_factory.mktemp("tiny") / "m", num_layers=2)
    return AutoModelForCausalLM.from_pretrained(path, attn_implementation="sdpa")


def _grads(model, loss):
    model.zero_grad()
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def _rand_ids(g, n):
    return torch.randint(7, 100, (n,), generator=g).tolist()


def test_sft_packed_equals_padded(model):
    g = torch.Generator().manual_seed(0)
    samples = []
    for n in (6, 11, 4, 9, 7):
        ids = _rand_ids(g, n)
        samples.append(SFTSample(ids, [0] * (n // 2) + [1] * (n - n // 2)))
    out = {}
    for packing in (False, True):
        b = sft_batch(samples, pad_id=0, packing=packing, row_capacity=20)
        lp = token_logprobs(model(**b.model_inputs()).logits, b)
        loss = sft_loss(lp, b.loss_mask)
        out[packing] = (loss.detach(), _grads(model, loss), b.input_ids.shape)
    assert out[True][2][0] < out[False][2][0]                    # fewer rows when packed
    assert torch.allclose(out[True][0], out[False][0], rtol=1e-5)
    for name, g_pad in out[False][1].items():
        assert torch.allclose(out[True][1][name], g_pad, rtol=1e-4, atol=1e-5), name


def test_dpo_packed_equals_padded(model):
    g = torch.Generator().manual_seed(1)
    samples = [PairSample(_rand_ids(g, 5), _rand_ids(g, 4), _rand_ids(g, 6)),
               PairSample(_rand_ids(g, 3), _rand_ids(g, 7), _rand_ids(g, 2))]
    ref_c, ref_r = torch.tensor([-30.0, -40.0]), torch.tensor([-35.0, -20.0])
    out = {}
    for packing in (False, True):
        b = pair_batch(samples, pad_id=0, packing=packing, row_capacity=32)
        lp = token_logprobs(model(**b.model_inputs()).logits, b)
        logps = segment_sum(lp * b.loss_mask, b.segment_ids, 4)
        loss, _, _ = preference_loss(logps[:2], logps[2:], ref_c, ref_r, beta=0.1)
        out[packing] = (logps.detach(), _grads(model, loss))
    assert torch.allclose(out[True][0], out[False][0], rtol=1e-5)
    for name, g_pad in out[False][1].items():
        assert torch.allclose(out[True][1][name], g_pad, rtol=1e-4, atol=1e-5), name
