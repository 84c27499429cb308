"""LoRA: only adapters train; merge/export reproduces the adapted model; QLoRA refuses CPU."""
import pytest
import torch

from hpc_rlhf.models.actor import load_actor
from hpc_rlhf.models.lora import LoraSpec, lora_scalings, merge_lora_state

pytestmark = pytest.mark.unit
SPEC = LoraSpec(rank=4, alpha=8.0, targets=("q_proj", "v_proj", "down_proj"))


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    from hpc_rlhf.models.tiny import ensure_tiny_model
    return ensure_tiny_model(tmp_path_factory.mktemp("models"))


def _train(model, steps=3):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        x = torch.randint(7, 100, (2, 16), generator=g)
        model(input_ids=x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad()


def test_lora_training_changes_only_adapters(tiny_path):
    model = load_actor(tiny_path, lora=SPEC)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n for n in trainable)
    _train(model)
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and changed <= trainable
    assert any(".lora_A." in n for n in changed) and any(".lora_B." in n for n in changed)


def test_merge_equals_adapted_logits_and_exports(tiny_path, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hpc_rlhf.checkpoint.export import export_hf
    model = load_actor(tiny_path, lora=SPEC)
    _train(model)
    model.eval()
    scal = lora_scalings(model)
    assert set(scal.values()) == {SPEC.alpha / SPEC.rank}
    merged = merge_lora_state(((n, p.detach()) for n, p in model.named_parameters()), scal)
    base_names = {n for n, _ in AutoModelForCausalLM.from_pretrained(tiny_path).named_parameters()}
    assert set(merged) == base_names
    out = export_hf(model, tmp_path / "export", AutoTokenizer.from_pretrained(tiny_path))
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    x = torch.randint(7, 100, (2, 12), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        want = model(input_ids=x).logits
        got = reloaded(input_ids=x).logits
        base = AutoModelForCausalLM.from_pretrained(tiny_path)(input_ids=x).logits
    assert (want - base).abs().max() > 1e-3          # the adapters do change the model
    torch.testing.assert_close(got, want, atol=2e-5, rtol=0)


def test_merge_cli(tiny_path, tmp_path):
    from transformers import AutoModelForCausalLM

    from hpc_rlhf.checkpoint.export import main
    model = load_actor(tiny_path, lora=SPEC)
    _train(model, steps=2)
    model.save_pretrained(tmp_path / "adapter")
    main(["--base", str(tiny_path), "--adapter", str(tmp_path / "adapter"),
          "--out", str(tmp_path / "merged")])
    x = torch.randint(7, 100, (1, 10), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        want = model.eval()(input_ids=x).logits
        got = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")(input_ids=x).logits
    torch.testing.assert_close(got, want, atol=2e-5, rtol=0)
    assert (tmp_path / "merged" / "tokenizer_config.json").exists()


def test_merge_math_naive():
    a, b, w = torch.randn(2, 5), torch.randn(3, 2), torch.randn(3, 5)
    named = [("base_model.model.m.q_proj.base_layer.weight", w),
             ("base_model.model.m.q_proj.lora_A.default.weight", a),
             ("base_model.model.m.q_proj.lora_B.default.weight", b),
             ("base_model.model.m.norm.weight", torch.ones(5))]
    out = merge_lora_state(named, {"m.q_proj#default": 0.5})
    assert set(out) == {"m.q_proj.weight", "m.norm.weight"}
    for i in range(3):
        for j in range(5):
            want = w[i, j] + 0.5 * sum(b[i, k] * a[k, j] for k in range(2))
            assert abs(out["m.q_proj.weight"][i, j] - want) < 1e-5


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU refusal")
def test_qlora_on_cpu_is_a_clear_error(tiny_path):
    with pytest.raises(RuntimeError, match="qlora=True needs a CUDA GPU"):
        load_actor(tiny_path, lora=LoraSpec(rank=4, qlora=True))


def test_spec_validation():
    with pytest.raises(ValueError, match="rank=-1"):
        LoraSpec(rank=-1)
    with pytest.raises(ValueError, match="qlora=True needs rank > 0"):
        LoraSpec(qlora=True)
