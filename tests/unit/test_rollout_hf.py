"""HFEngine on the tiny model: order, n samples, stops, logprobs vs a naive recompute."""
import pytest
import torch

from hpc_rlhf.models.tiny import ensure_tiny_model
from hpc_rlhf.rollout import HFEngine, RolloutEngine, SamplingConfig, logprob_gap

pytestmark = pytest.mark.unit

LOGPROB_TOL = 1e-4  # float32, left-padded batch vs unpadded recompute
PROMPTS = [[1, 4, 40, 41, 42], [1, 4, 50], [1, 4, 60, 61, 62, 63, 64, 65]]


def naive_logprobs(model, rollout, temperature):
    ids = torch.tensor([rollout.prompt_ids + rollout.response_ids])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].double()              # [T, v]
    p = len(rollout.prompt_ids)
    lp = torch.log_softmax(logits[p - 1:-1] / (temperature or 1.0), dim=-1)
    return lp.gather(-1, torch.tensor(rollout.response_ids)[:, None]).squeeze(-1).float()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    path = ensure_tiny_model(tmp_path_factory.mktemp("models"))
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    return model, AutoTokenizer.from_pretrained(path)


@pytest.fixture
def engine(tiny):
    model, tok = tiny
    return HFEngine(model, eos_token_ids=[tok.eos_token_id], pad_token_id=tok.pad_token_id,
                    tokenizer=tok)


@pytest.mark.parametrize("temperature", [0.0, 0.7])
def test_prompt_major_and_logprobs_match_recompute(engine, tiny, temperature):
    assert isinstance(engine, RolloutEngine)
    n = 1 if temperature == 0 else 3
    rollouts = engine.generate(PROMPTS, SamplingConfig(n=n, max_new_tokens=10,
                                                       temperature=temperature, seed=0))
    assert len(rollouts) == len(PROMPTS) * n
    for k, r in enumerate(rollouts):
        assert (r.prompt_index, r.sample_index) == divmod(k, n)
        assert r.prompt_ids == PROMPTS[r.prompt_index]
        assert len(r.response_ids) == 10 or r.finish_reason == "stop"
    gap = logprob_gap(rollouts, [naive_logprobs(tiny[0], r, temperature) for r in rollouts])
    assert gap["logprob_gap_max"] < LOGPROB_TOL
    if temperature == 0:   # greedy = argmax of the unpadded model
        for r in rollouts:
            ids = torch.tensor([r.prompt_ids + r.response_ids])
            with torch.no_grad():
                logits = tiny[0](input_ids=ids).logits[0]
            p = len(r.prompt_ids)
            assert logits[p - 1:-1].argmax(-1).tolist() == r.response_ids


def _responses(engine, sampling) -> list[list[int]]:
    return [r.response_ids for r in engine.generate(PROMPTS, sampling)]


def test_seeded_and_batch_size_invariant_for_greedy(tiny):
    model, tok = tiny
    one = HFEngine(model, eos_token_ids=[2], pad_token_id=0, batch_size=1)
    many = HFEngine(model, eos_token_ids=[2], pad_token_id=0)
    greedy = SamplingConfig(max_new_tokens=6, temperature=0)
    greedy_ids = _responses(many, greedy)
    assert _responses(one, greedy) == greedy_ids
    sampled = SamplingConfig(n=2, max_new_tokens=6, seed=3)
    seed3 = _responses(many, sampled)
    assert _responses(many, sampled) == seed3                       # same seed, same samples
    # ... and the seed is used: another seed samples otherwise (an engine that ignored the seed
    # and reseeded to a constant, or sampled greedily, would give the same lists).
    assert _responses(many, SamplingConfig(n=2, max_new_tokens=6, seed=4)) != seed3
    # Sampling really samples: the random tiny model's next-token distribution is close to
    # uniform over its 128 tokens, so at T=1 no 6-token sample follows the greedy path (a
    # sampler that fell back to argmax would repeat greedy_ids twice over).
    assert all(ids != greedy_ids[k // 2] for k, ids in enumerate(seed3)), (seed3, greedy_ids)


def test_stop_token_and_stop_string(engine, tiny):
    _, tok = tiny
    greedy = SamplingConfig(max_new_tokens=10, temperature=0)
    (free,) = engine.generate(PROMPTS[:1], greedy)
    assert free.finish_reason == "length"
    stop_tok = free.response_ids[3]
    cut = free.response_ids.index(stop_tok) + 1
    (by_tok,) = engine.generate(PROMPTS[:1], SamplingConfig(
        max_new_tokens=10, temperature=0, stop_token_ids=(stop_tok,)))
    assert by_tok.finish_reason == "stop" and by_tok.response_ids == free.response_ids[:cut]
    text = tok.decode(free.response_ids[2:4])           # two characters -> a 2-char stop string
    (by_str,) = engine.generate(PROMPTS[:1], SamplingConfig(
        max_new_tokens=10, temperature=0, stop=(text,)))
    assert by_str.finish_reason == "stop"
    assert text in tok.decode(by_str.response_ids)
    assert text not in tok.decode(by_str.response_ids[:-1])   # ends where the string completes


def test_load_weights_changes_model(tiny):
    from transformers import AutoModelForCausalLM
    model, _ = tiny
    clone = AutoModelForCausalLM.from_config(model.config).eval()
    eng = HFEngine(clone, eos_token_ids=[2], pad_token_id=0)
    eng.load_weights(model.state_dict().items())
    for (n, a), (_, b) in zip(model.state_dict().items(), clone.state_dict().items()):
        assert torch.equal(a, b), n
    with pytest.raises(KeyError, match="nope"):
        eng.load_weights([("nope.weight", torch.zeros(1))])
