"""The model cache counts an entry only once it loads, rebuilds a marked but broken entry, and
keys entries by what built them (hpc_rlhf.models.cache)."""
import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from hpc_rlhf.models.cache import MARKER, build_key, cached_build
from hpc_rlhf.models.tiny import build_tiny_model, ensure_tiny_model

pytestmark = pytest.mark.unit


def test_marked_entry_without_config_or_weights_is_rebuilt(tmp_path, capfd):
    first = ensure_tiny_model(tmp_path)
    want = AutoModelForCausalLM.from_pretrained(first).state_dict()
    # What a non-zero rank left before: tokenizer and marker, but no config and no weights.
    (first / "config.json").unlink()
    (first / "model.safetensors").unlink()
    assert (first / MARKER).exists()
    again = ensure_tiny_model(tmp_path)
    assert again == first
    err = capfd.readouterr().err
    assert f"[cache] {first} is marked complete but has no config.json: rebuilding it" in err
    got = AutoModelForCausalLM.from_pretrained(again).state_dict()
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in want)  # same seed, same weights


def test_empty_weights_file_is_rebuilt(tmp_path, capfd):
    first = ensure_tiny_model(tmp_path, arch="qwen2")
    (first / "model.safetensors").write_bytes(b"")
    ensure_tiny_model(tmp_path, arch="qwen2")
    assert "no weights (model.safetensors missing or empty): rebuilding" in capfd.readouterr().err
    AutoModelForCausalLM.from_pretrained(first)


def test_build_that_writes_no_model_is_refused_and_leaves_nothing(tmp_path):
    def tokenizer_only(tmp):  # what save_pretrained on rank 1 of a world used to leave
        tmp.mkdir(parents=True)
        (tmp / "tokenizer.json").write_text("{}")
    out = tmp_path / "entry"
    with pytest.raises(RuntimeError, match="the result has no config.json"):
        cached_build(out, "k", tokenizer_only)
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["entry.lock"]  # no .tmp directory left


def test_entry_from_another_builder_is_not_reused(tmp_path):
    first = build_tiny_model(tmp_path / "a")
    (first / MARKER).write_text(json.dumps({"key": "older"}))
    calls = []

    def build(tmp):
        calls.append(tmp)
        build_tiny_model(tmp, seed=1)
    cached_build(first, "newer", build)
    assert len(calls) == 1 and json.loads((first / MARKER).read_text())["key"] == "newer"
    cached_build(first, "newer", build)
    assert len(calls) == 1  # checked entry reused


def test_build_key_follows_the_builder_source(tmp_path):
    src = tmp_path / "builder.py"
    src.write_text("x = 1\n")
    a = build_key(src)
    assert build_key(src) == a and len(a) == 8
    src.write_text("x = 2\n")
    assert build_key(src) != a
    assert build_key(src, extra="other.gguf") != build_key(src)
