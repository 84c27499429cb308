"""LoRA on the critic / value model: adapters + value head train, the base stays frozen, and the
exported (merged) HF value model gives the trained values back.

Tolerances: values of a fresh LoRA critic equal the plain critic's 1e-6 (B = 0 at init);
exported vs in-memory values 1e-5 (fp32; merge W + s*B@A reorders the sums).
"""
import pytest
import torch

from hpc_rlhf.models.heads import ValueModel, load_value_model, response_values
from hpc_rlhf.models.lora import LoraSpec

pytestmark = pytest.mark.unit
SPEC = LoraSpec(rank=4, alpha=8.0, targets=("q_proj", "v_proj", "up_proj"))


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    from hpc_rlhf.models.tiny import ensure_tiny_model
    return ensure_tiny_model(tmp_path_factory.mktemp("models"))


def _batch():
    ids = torch.tensor([[0, 0, 30, 31, 32, 33, 34, 35], [40, 41, 42, 43, 44, 45, 46, 47]])
    return ids, (ids != 0).long()


def _lora_critic(path):
    torch.manual_seed(0)             # the fresh score head (HF init) and lora_A draw from it
    return load_value_model(path, lora=SPEC)


def test_lora_critic_is_the_plain_critic_at_init_and_freezes_the_base(tiny_path):
    vm = _lora_critic(tiny_path)
    torch.manual_seed(0)
    plain = load_value_model(tiny_path)
    ids, mask = _batch()
    with torch.no_grad():
        torch.testing.assert_close(vm(ids, mask), plain(ids, mask), atol=1e-6, rtol=0)
    trainable = {n for n, p in vm.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n or
                             "score.modules_to_save." in n for n in trainable), trainable
    assert any("score.modules_to_save." in n for n in trainable)   # the value head trains
    assert {n.split(".")[-4] for n in trainable if ".lora_" in n} == set(SPEC.targets)
    # the backbone is the HF trunk under peft (the bug: it was the whole *ForSequenceClassification)
    assert type(vm.backbone).__name__ == "LlamaModel"


def test_a_step_changes_only_adapters_and_head_and_export_round_trips(tiny_path, tmp_path):
    from hpc_rlhf.checkpoint.export import export_hf
    vm = _lora_critic(tiny_path).train()
    before = {n: p.detach().clone() for n, p in vm.named_parameters()}
    opt = torch.optim.AdamW([p for p in vm.parameters() if p.requires_grad], lr=1e-2)
    ids, mask = _batch()
    returns = torch.tensor([[0.5, -1.0, 2.0], [1.0, 0.0, -0.5]])
    losses = []
    for _ in range(3):                                   # critic regression, as in PPO
        v = response_values(vm, ids, mask, response_len=3)
        loss = ((v - returns) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    changed = {n for n, p in vm.named_parameters() if not torch.equal(p, before[n])}
    frozen_changed = {n for n in changed if not vm.get_parameter(n).requires_grad}
    assert not frozen_changed, frozen_changed
    assert any(".lora_B." in n for n in changed) and any(".lora_A." in n for n in changed)
    assert any("score.modules_to_save." in n for n in changed)
    assert all(".lora_" in n or "score.modules_to_save." in n for n in changed), changed

    vm.eval()
    with torch.no_grad():
        want = vm(ids, mask)
    out = export_hf(vm, tmp_path / "critic")               # merged, plain HF value model
    from safetensors.torch import load_file
    names = set(load_file(out / "model.safetensors"))
    assert "score.weight" in names and not any("lora" in n or "modules_to_save" in n
                                               for n in names)
    again = load_value_model(out).eval()
    assert not hasattr(again.hf, "peft_config")
    with torch.no_grad():
        got = again(ids, mask)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    with torch.no_grad():                               # not vacuous: training moved the values
        assert (got - _lora_critic(tiny_path)(ids, mask)).abs().max() > 1e-3


def test_value_model_without_lora_is_unchanged(tiny_path):
    torch.manual_seed(0)
    vm = load_value_model(tiny_path, lora=LoraSpec(rank=0))
    assert isinstance(vm, ValueModel) and not hasattr(vm.hf, "peft_config")
    assert all(p.requires_grad for p in vm.parameters())


def test_qlora_critic_on_cpu_is_a_clear_error(tiny_path):
    if torch.cuda.is_available():
        pytest.skip("CPU-only check")
    with pytest.raises(RuntimeError, match="lora.qlora=True needs a CUDA GPU"):
        load_value_model(tiny_path, lora=LoraSpec(rank=4, qlora=True))
