"""An exported (trained) checkpoint serves in vLLM with HF's greedy tokens."""
import pytest
import torch

pytestmark = [pytest.mark.vllm, pytest.mark.e2e]


@pytest.mark.timeout(300)
def test_export_loads_in_hf_and_vllm_same_greedy_tokens(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hpc_rlhf.checkpoint.export import export_hf
    from hpc_rlhf.models.actor import load_actor
    from hpc_rlhf.models.tiny import ensure_tiny_model
    path = ensure_tiny_model(tmp_path / "models")
    model = load_actor(path)  # LoRA merge is checked against logits in test_lora.py
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    tok = AutoTokenizer.from_pretrained(path)
    text = tok("the cat sat on the mat. " * 3, return_tensors="pt").input_ids
    for _ in range(25):  # memorise a phrase so greedy decoding is not degenerate
        model(input_ids=text, labels=text).loss.backward()
        opt.step()
        opt.zero_grad()
    out = export_hf(model, tmp_path / "export", tok)
    prompts = ["the cat", "sat on"]
    hf = AutoModelForCausalLM.from_pretrained(out).eval()
    hf_tokens = []
    for p in prompts:
        ids = tok(p, return_tensors="pt").input_ids
        gen = hf.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=0)
        hf_tokens.append(gen[0, ids.shape[1]:].tolist())

    from vllm import LLM, SamplingParams
    llm = LLM(str(out), dtype="float32", max_model_len=128, enforce_eager=True, seed=0)
    outs = llm.generate(prompts, SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))
    vllm_tokens = [o.outputs[0].token_ids for o in outs]
    print("hf", hf_tokens, "\nvllm", vllm_tokens)
    assert [list(t) for t in vllm_tokens] == [t[:len(v)] for t, v in zip(hf_tokens, vllm_tokens)]
    assert len(set(hf_tokens[0])) > 1
