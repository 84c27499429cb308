"""Tiny models build deterministically, save, reload, and generate with HF; tasks score."""
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from hpc_rlhf.data.tasks import TASKS, make_task, task_name, task_reward
from hpc_rlhf.models.resolve import resolve_model_path
from hpc_rlhf.models.tiny import build_tiny_model, ensure_tiny_model

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("arch,cls", [("llama", "LlamaForCausalLM"), ("qwen2", "Qwen2ForCausalLM")])
def test_build_save_reload_generate(tmp_path, arch, cls):
    a = build_tiny_model(tmp_path / "a", arch=arch, seed=3)
    b = build_tiny_model(tmp_path / "b", arch=arch, seed=3)
    ma, mb = (AutoModelForCausalLM.from_pretrained(p) for p in (a, b))
    assert type(ma).__name__ == cls
    assert ma.config.head_dim if arch == "llama" else True
    assert ma.config.hidden_size // ma.config.num_attention_heads == 64
    for (na, pa), (nb, pb) in zip(ma.state_dict().items(), mb.state_dict().items()):
        assert na == nb and torch.equal(pa, pb), na  # same seed, same weights
    other = AutoModelForCausalLM.from_pretrained(build_tiny_model(tmp_path / "c", arch=arch, seed=4))
    assert not torch.equal(other.model.embed_tokens.weight, ma.model.embed_tokens.weight)

    tok = AutoTokenizer.from_pretrained(a)
    enc = tok.apply_chat_template([{"role": "user", "content": "Copy: ab"}],
                                  add_generation_prompt=True, return_tensors="pt")
    ids = enc["input_ids"]
    assert tok.decode(ids[0]) == "<|user|>Copy: ab<|assistant|>"
    assert ids.shape[1] == 1 + len("Copy: ab") + 1  # one token per character
    out = ma.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, do_sample=False,
                      pad_token_id=tok.pad_token_id)
    assert out.shape[1] == ids.shape[1] + 5 or tok.eos_token_id in out[0].tolist()
    again = ma.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=5,
                        do_sample=False, pad_token_id=tok.pad_token_id)
    assert torch.equal(out, again)


def test_ensure_tiny_model_caches(tmp_path):
    first = ensure_tiny_model(tmp_path)
    stamp = (first / "model.safetensors").stat().st_mtime_ns
    assert ensure_tiny_model(tmp_path) == first
    assert (first / "model.safetensors").stat().st_mtime_ns == stamp


def test_resolve_tiny_uses_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HPC_RLHF_CACHE", str(tmp_path))
    path = resolve_model_path("tiny:qwen2")
    assert path.startswith(str(tmp_path)) and "/tiny-qwen2-0-" in path
    assert resolve_model_path("/some/dir") == "/some/dir"


@pytest.mark.parametrize("name", sorted(TASKS))
def test_tasks_are_deterministic_and_answers_score_one(name):
    a, b = make_task(f"task:{name}", 50, seed=1), make_task(f"task:{name}", 50, seed=1)
    assert a == b and a != make_task(f"task:{name}", 50, seed=2)
    reward = task_reward(f"task:{name}")
    assert all(reward(s.answer, s.label) == 1.0 for s in a)
    assert all(reward("zzz", s.label) < 0.5 for s in a)


def test_task_rewards_partial_credit():
    assert task_reward("task:arithmetic")("The answer is 12, not 3", "12") == 1.0
    assert task_reward("task:arithmetic")("3 then 12", "12") == 0.0
    assert task_reward("task:repeat")("aaaa", "a") == 0.5   # 4 right out of at least 8
    assert task_reward("task:copy")("abx", "abc") == pytest.approx(0.5 * 2 / 3)


def test_unknown_task_names_the_choices():
    with pytest.raises(ValueError, match="task:arithmetic"):
        task_name("task:chess")
