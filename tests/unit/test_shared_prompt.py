"""Shared-prompt forwards (rl/shared_prompt.py) equal the padded forward: response logits,
and the gradient of a weighted sum of logprobs, on tiny Llama and Qwen2 models (eager and
sdpa attention), for groups of different sizes and prompt lengths, an empty response, and a
sample whose prompt matches no neighbour."""
import random

import pytest
import torch

from hpc_rlhf.engine.logprobs import logprobs_from_logits, response_logits
from hpc_rlhf.recipes.rl.experience import make_batch
from hpc_rlhf.recipes.rl.shared_prompt import (packed_tokens, prompt_runs, shared_layout,
                                                shared_response_logits)

pytestmark = pytest.mark.unit


def _batch():
    rng = random.Random(0)
    groups = [([1, 4, 40, 41, 42], 3), ([1, 4, 50], 3), ([1, 9, 9, 60, 61, 62, 63], 1),
              ([1, 4, 50], 2)]   # the last repeats group 2's prompt after another one
    prompts, resps = [], []
    for prompt, n in groups:
        for j in range(n):
            prompts.append(prompt)
            resps.append([] if (prompt[-1] == 50 and j == 1 and n == 3)
                         else [rng.randrange(3, 100) for _ in range(rng.randint(1, 7))])
    logp = [torch.zeros(len(r)) for r in resps]
    return make_batch(prompts, resps, logp, torch.zeros(len(resps)), pad_id=0)


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def tiny_path(request, tmp_path_factory):
    from hpc_rlhf.models.tiny import ensure_tiny_model
    return ensure_tiny_model(tmp_path_factory.mktemp(request.param), arch=request.param)


def test_prompt_runs_are_consecutive_identical_prompts():
    assert prompt_runs(_batch()) == [(0, 3), (3, 6), (6, 7), (7, 9)]


def test_layout_saves_the_repeated_prompts():
    batch = _batch()
    input_ids, _, mask, _, valid = shared_layout(batch)
    real = int(batch.attention_mask.sum())
    packed = int(sum(mask[g, 0].diagonal().sum() for g in range(mask.shape[0])))  # incl. pad
    assert input_ids.shape[0] == 4 and valid.sum() == batch.action_mask.sum()
    # tokens run: each group's prompt once (5 + 3 + 7 + 3) plus every response token
    responses = int(batch.action_mask.sum())
    assert int((input_ids != 0).sum()) == 5 + 3 + 7 + 3 + responses < real
    assert packed == input_ids.numel()
    assert packed_tokens(batch) == 5 + 3 + 7 + 3 + responses   # the train/forward_tokens count


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_shared_forward_equals_padded_forward_with_gradient(tiny_path, attn):
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(tiny_path, attn_implementation=attn)
    batch = _batch()
    R = batch.response_len
    labels = batch.input_ids[:, -R:]
    mask = batch.action_mask
    weights = torch.randn(mask.shape, generator=torch.Generator().manual_seed(1))

    def run(shared):
        model.zero_grad()
        logits = (shared_response_logits(model, batch) if shared
                  else response_logits(model, batch.input_ids, batch.attention_mask, R))
        lp = logprobs_from_logits(logits, labels)
        ((lp * weights)[mask].sum()).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        return logits.detach(), lp.detach(), grads

    logits_s, lp_s, grads_s = run(True)
    logits_p, lp_p, grads_p = run(False)
    assert logits_s.shape == logits_p.shape
    torch.testing.assert_close(logits_s[mask], logits_p[mask], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lp_s[mask], lp_p[mask], rtol=1e-5, atol=1e-5)
    for name, g in grads_p.items():
        assert g.abs().max() > 0 or name.endswith("bias"), name
        # float32 summation order differs (shared prompt positions sum n upstream grads)
        torch.testing.assert_close(grads_s[name], g, rtol=1e-4, atol=1e-6 * float(g.abs().max()),
                                   msg=name)


@pytest.mark.parametrize("head_alone", [True, False])
def test_shared_logprobs_equal_padded_logprobs_entropy_and_gradient(tiny_path, head_alone,
                                                                   monkeypatch):
    """The fused path (no [B, R, V] gather) against the padded forward + separate functions;
    head_alone=False: the model's own forward with logits_to_keep (models that scale logits)."""
    from transformers import AutoModelForCausalLM

    from hpc_rlhf.recipes.rl import shared_prompt
    from hpc_rlhf.recipes.rl.shared_prompt import shared_logprobs
    if not head_alone:
        monkeypatch.setattr(shared_prompt, "_decoder_and_head", lambda model: None)
    from hpc_rlhf.engine.logprobs import entropy_from_logits
    model = AutoModelForCausalLM.from_pretrained(tiny_path, attn_implementation="eager")
    batch = _batch()
    R, mask = batch.response_len, batch.action_mask
    weights = torch.randn(mask.shape, generator=torch.Generator().manual_seed(2))

    def run(shared):
        model.zero_grad()
        if shared:
            lp, ent = shared_logprobs(model, batch, temperature=0.8)
        else:
            logits = response_logits(model, batch.input_ids, batch.attention_mask, R)
            lp = logprobs_from_logits(logits, batch.input_ids[:, -R:], 0.8)
            ent = entropy_from_logits(logits.detach(), 0.8)
        ((lp * weights)[mask].sum()).backward()
        return lp.detach(), ent, {n: p.grad.clone() for n, p in model.named_parameters()}

    lp_s, ent_s, g_s = run(True)
    lp_p, ent_p, g_p = run(False)
    assert not ent_s.requires_grad and torch.equal(lp_s[~mask], torch.zeros_like(lp_s[~mask]))
    torch.testing.assert_close(lp_s[mask], lp_p[mask], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ent_s[mask], ent_p[mask], rtol=1e-5, atol=1e-5)
    for name, g in g_p.items():
        torch.testing.assert_close(g_s[name], g, rtol=1e-4, atol=1e-6 * float(g.abs().max()),
                                   msg=name)
