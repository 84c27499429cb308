"""attn_implementation="ring" on one process (ring of one) for HF Llama and Qwen2 equals the
stock model run on each packed sample separately. Tolerance: float64, 1e-10."""
import pytest
import torch

from hpc_rlhf.ring_attn import enable_ring_attention, ring_attention_scope, shard_batch_for_ring

pytestmark = pytest.mark.unit

CU = [0, 6, 19, 31]


def _tiny(family):
    import transformers

    common = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=96, max_position_embeddings=128)
    if family == "llama":
        config, cls = transformers.LlamaConfig(head_dim=16, **common), transformers.LlamaForCausalLM
    else:
        config, cls = transformers.Qwen2Config(**common), transformers.Qwen2ForCausalLM
    torch.manual_seed(0)
    return cls(config).double()


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_ring_of_one_equals_per_sample_forward(family):
    model = _tiny(family)
    torch.manual_seed(1)
    ids = torch.randint(0, 96, (CU[-1],))
    with torch.no_grad():
        ref = torch.cat([model(ids[s:e][None], use_cache=False).logits[0] for s, e in zip(CU, CU[1:])])
        enable_ring_attention(model)
        shard = shard_batch_for_ring(ids, CU, rank=0, world=1)
        with ring_attention_scope(shard.layout):
            out = model(shard.input_ids, position_ids=shard.position_ids, use_cache=False).logits[0]
    assert (out - ref).abs().max() < 1e-10
