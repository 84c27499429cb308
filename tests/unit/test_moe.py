"""MoE auxiliary (router load-balancing) loss pass-through: hpc_rlhf.engine.moe.

The aux term our helper hands to the trainers is checked against the Switch-Transformer
load-balancing loss recomputed naively (loops, float64) from the same forward's router logits,
and `loss + coef * aux` (value and router gradients) against base + coef * naive. Tolerance
1e-6 absolute (fp32 forward; the naive sum runs in float64).
"""
import pytest
import torch

from hpc_rlhf.config import ConfigError, load_config
from hpc_rlhf.engine.moe import RouterAuxLoss, attach_router_aux_loss, check_moe_model

pytestmark = pytest.mark.unit
TOL = 1e-6


@pytest.fixture(scope="module")
def moe_paths(tmp_path_factory):
    from hpc_rlhf.models.tiny import MOE_ARCHS, ensure_tiny_model
    root = tmp_path_factory.mktemp("moe")
    return {arch: ensure_tiny_model(root, arch) for arch in MOE_ARCHS}


def _load(path):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


def naive_load_balancing_loss(router_logits, attention_mask, num_experts: int, top_k: int):
    """Switch Transformer eq. 4-6 over all MoE layers, padding excluded:
        f_e = (1 / (L * n)) * sum_layers sum_real_tokens [e in top_k(token)]
        P_e = (1 / (L * n)) * sum_layers sum_real_tokens softmax(logits)_e
        aux = E * sum_e f_e * P_e          (n = real tokens, L = MoE layers)
    Returns a float64 tensor that carries gradients through P_e (f_e is a count)."""
    mask = attention_mask.reshape(-1).tolist()                   # [b*T] token order as logits
    counts = [0.0] * num_experts
    prob_sum = [torch.zeros((), dtype=torch.float64) for _ in range(num_experts)]
    rows = 0
    for layer in router_logits:                                  # [b*T, E] per layer
        for t in range(layer.shape[0]):
            if not mask[t]:
                continue
            probs = torch.softmax(layer[t].double(), dim=-1)      # [E]
            chosen = torch.topk(probs.detach(), top_k).indices.tolist()
            for e in range(num_experts):
                counts[e] += 1.0 if e in chosen else 0.0
                prob_sum[e] = prob_sum[e] + probs[e]
            rows += 1
    return num_experts * sum((counts[e] / rows) * (prob_sum[e] / rows)
                             for e in range(num_experts))


def _batch():
    ids = torch.tensor([[0, 0, 0, 40, 41, 42, 43, 44, 45, 46],    # left padded
                        [50, 51, 52, 53, 54, 55, 56, 57, 58, 59]])
    mask = (ids != 0).long()
    return ids, mask


@pytest.mark.parametrize("arch", ["mixtral", "qwen3_moe", "qwen2_moe"])
def test_aux_term_equals_naive_recomputation_and_loss_adds_coef_times_it(moe_paths, arch):
    from hpc_rlhf.engine.logprobs import logprobs_from_logits, response_logits
    model = _load(moe_paths[arch]).train()
    cfg = model.config
    num_experts = getattr(cfg, "num_local_experts", None) or cfg.num_experts
    coef = 0.37
    aux = attach_router_aux_loss(model, coef)
    assert attach_router_aux_loss(model, coef) is aux           # idempotent per step
    seen = {}
    grab = model.register_forward_hook(lambda m, a, out: seen.update(router=out.router_logits))
    ids, mask = _batch()
    # the RL path's forward helper: no output_router_logits argument, only logits come back
    logits = response_logits(model, ids, mask, response_len=4)  # [b, 4, v]
    grab.remove()
    base = -logprobs_from_logits(logits, ids[:, -4:]).mean()
    assert aux.last is not None and aux.last.requires_grad
    naive = naive_load_balancing_loss(seen["router"], mask, num_experts, cfg.num_experts_per_tok)
    assert len(seen["router"]) == cfg.num_hidden_layers
    assert abs(aux.last.item() - naive.item()) <= TOL, (aux.last.item(), naive.item())
    assert naive.item() > 1.0        # about top_k for a near-uniform router: not vacuous
    metrics = {}
    total = aux.add_to(base, metrics)
    assert aux.last is None                                     # consumed: never reused
    assert abs(total.item() - (base.item() + coef * naive.item())) <= TOL
    assert metrics["moe_aux_loss"] == pytest.approx(naive.item(), abs=TOL)
    # gradients reach the routers: d(total)/d(gate) == d(base + coef * naive)/d(gate)
    gates = [p for n, p in model.named_parameters() if n.endswith("mlp.gate.weight")]
    assert len(gates) == cfg.num_hidden_layers
    got = torch.autograd.grad(total, gates, retain_graph=True)
    want = torch.autograd.grad(base + coef * naive.float(), gates)
    for g, w in zip(got, want):
        assert g.abs().max() > 0
        torch.testing.assert_close(g, w, atol=TOL, rtol=0)


def test_coef_zero_is_a_no_op_and_a_new_coef_replaces_the_hooks(moe_paths):
    model = _load(moe_paths["mixtral"]).eval()
    ids, mask = _batch()
    off = attach_router_aux_loss(model, 0.0)
    assert not off.enabled
    out = model(input_ids=ids, attention_mask=mask)
    assert out.aux_loss is None                                 # forward untouched
    loss = torch.tensor(1.5)
    assert off.add_to(loss) is loss
    on = attach_router_aux_loss(model, 0.1)                     # replaces the off recorder
    assert on is not off and on.enabled
    with torch.no_grad():
        plain = model(input_ids=ids, attention_mask=mask, output_router_logits=True).aux_loss
    assert on.pop().item() == pytest.approx(plain.item(), abs=TOL)
    on.close()
    assert model(input_ids=ids, attention_mask=mask).aux_loss is None   # hooks removed
    with pytest.raises(RuntimeError, match="no forward"):
        on.pop()


def test_peft_wrapped_moe_records_the_aux_loss(moe_paths):
    from hpc_rlhf.models.lora import LoraSpec, apply_lora
    model = apply_lora(_load(moe_paths["qwen3_moe"]), LoraSpec(rank=4, targets=("q_proj",)))
    aux = attach_router_aux_loss(model, 0.2)
    ids, mask = _batch()
    model(input_ids=ids, attention_mask=mask)
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=mask, output_router_logits=True).aux_loss
    assert aux.pop().item() == pytest.approx(want.item(), abs=TOL)


def test_coef_on_a_dense_model_is_a_clear_error(tmp_path):
    from transformers import AutoModelForCausalLM

    from hpc_rlhf.models.tiny import tiny_config
    dense = AutoModelForCausalLM.from_config(tiny_config("llama"))
    with pytest.raises(ValueError, match=r"train\.aux_loss_coef=0\.1 needs a mixture-of-experts.*"
                                         r"'llama'.*set train\.aux_loss_coef=0"):
        attach_router_aux_loss(dense, 0.1)
    with pytest.raises(ValueError, match="train.aux_loss_coef=-1.0 must be >= 0"):
        check_moe_model(dense, -1.0)
    assert not RouterAuxLoss(dense, 0.0).enabled               # off: any model is fine


def test_sft_trainer_refuses_coef_on_a_dense_model_before_training():
    from types import SimpleNamespace

    from hpc_rlhf.models.tiny import tiny_config
    from hpc_rlhf.recipes.sft import train_sft
    from transformers import AutoModelForCausalLM
    dense = AutoModelForCausalLM.from_config(tiny_config("llama"))
    cfg = load_config(None, ["train.trainer=sft", "train.aux_loss_coef=0.01"]).train
    with pytest.raises(ValueError, match=r"train\.aux_loss_coef=0\.01 needs a mixture"):
        train_sft(dense, SimpleNamespace(device="cpu", dp_rank=0, dp_size=1), [],
                  train_cfg=cfg, packing=False, pad_id=0, log=None)


@pytest.mark.parametrize("overrides, words", [
    (["train.aux_loss_coef=-0.5"], "train.aux_loss_coef=-0.5 must be >= 0"),
    (["train.trainer=rm", "train.aux_loss_coef=0.01"],
     "train.aux_loss_coef=0.01 (MoE load-balancing loss) is wired into the ['sft', 'dpo', 'rl']"),
    (["train.trainer=sft", "train.aux_loss_coef=0.01", "train.ring_attn_size=2",
      "topology.procs_per_node=2"], "train.aux_loss_coef=0.01 with train.ring_attn_size=2"),
])
def test_config_rules(overrides, words):
    with pytest.raises(ConfigError) as e:
        load_config(None, overrides)
    assert words in str(e.value)


def test_config_accepts_coef_for_wired_trainers():
    for trainer in ("sft", "dpo", "rl"):
        cfg = load_config(None, [f"train.trainer={trainer}", "train.aux_loss_coef=0.01"])
        assert cfg.train.aux_loss_coef == 0.01
    assert load_config().train.aux_loss_coef == 0.0
