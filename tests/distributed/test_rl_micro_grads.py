"""Dynamic RL micro-batches (train.max_tokens_per_micro_batch) through DeepSpeed ZeRO-3 on 2
gloo ranks: the accumulated gradient at the optimizer step equals a plain-torch gradient of the
whole step's loss (each rank's rows in one padded batch, averaged over ranks), although the
ranks cut their rows into different numbers of micro-batches before equalising the count.

A wrong share (e.g. 1 / count instead of tokens / tokens), a missing boundary, or DeepSpeed's
1 / grad_accum applied on top would each change the gradient far beyond the tolerance."""
import json
from pathlib import Path

import pytest
import torch
from distlib import init_rank, run_ranks

pytestmark = [pytest.mark.distributed, pytest.mark.deepspeed]

ROWS, BUDGET, LOSS_AGG = 12, 60, "token_mean"
CHECKED = ("model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight",
           "model.layers.1.mlp.down_proj.weight", "lm_head.weight")


def rank_batch(rank: int):
    """Rank 0: short rows; rank 1: long rows (so its budget split has more micro-batches)."""
    import random

    from hpc_rlhf.recipes.rl.experience import make_batch
    rng = random.Random(rank)
    longest = 6 if rank == 0 else 20
    prompts = [[rng.randrange(3, 100) for _ in range(rng.randint(2, 8))] for _ in range(ROWS)]
    resps = [[rng.randrange(3, 100) for _ in range(rng.randint(1, longest))] for _ in range(ROWS)]
    batch = make_batch(prompts, resps, [torch.zeros(len(r)) for r in resps], torch.zeros(ROWS),
                       pad_id=0)
    adv = torch.randn(batch.action_mask.shape, generator=torch.Generator().manual_seed(10 + rank))
    return batch, adv


def micro_loss(model, mb, adv):
    from hpc_rlhf.algos.losses import policy_loss
    from hpc_rlhf.engine.logprobs import logprobs_from_logits, response_logits
    r = mb.response_len
    logits = response_logits(model, mb.input_ids, mb.attention_mask, r)
    logp = logprobs_from_logits(logits, mb.input_ids[:, -r:])
    return policy_loss(logp, logp.detach(), adv[:, :r], mb.action_mask, clip_eps_low=0.2,
                       clip_eps_high=0.2, loss_agg=LOSS_AGG)[0]


def _worker(rank, world, port, model_path, out_dir):
    init_rank(rank, world, port)
    from deepspeed.utils import safe_get_full_grad
    from transformers import AutoModelForCausalLM

    from hpc_rlhf.engine.deepspeed_strategy import DeepSpeedStrategy, StrategyConfig
    from hpc_rlhf.recipes.rl.micro import budget_split, real_lengths, train_steps
    strat = DeepSpeedStrategy(StrategyConfig(zero_stage=3, micro_batch_size=ROWS, grad_accum=1,
                                             lr=1e-3, max_grad_norm=0.0))
    strat.setup_distributed()
    engine = strat.prepare_model(AutoModelForCausalLM.from_pretrained(model_path))
    engine.train()
    batch, adv = rank_batch(rank)
    p, r = real_lengths(batch)
    local = len(budget_split(p.tolist(), r.tolist(), BUDGET))
    steps = train_steps(batch, micro_batch_size=ROWS, grad_accum=1, max_tokens=BUDGET,
                        loss_agg=LOSS_AGG, generator=torch.Generator().manual_seed(0))
    assert len(steps) == 1
    grads = {}
    for m in steps[0]:
        strat.backward(micro_loss(engine, m.batch, adv[m.index]), engine, weight=m.weight,
                       boundary=m.boundary)
        if m.boundary:  # after the last backward, before the optimizer consumes the grads
            named = dict(engine.module.named_parameters())
            grads = {n: safe_get_full_grad(named[n]).clone() for n in CHECKED}
        strat.step(engine)
    if rank == 0:
        torch.save(grads, Path(out_dir) / "grads.pt")
    with open(Path(out_dir) / f"counts{rank}.json", "w") as f:
        json.dump({"local": local, "final": len(steps[0]),
                   "weights": [m.weight for m in steps[0]]}, f)


@pytest.mark.timeout(300)
def test_dynamic_micro_batches_give_the_whole_step_gradient(tmp_path):
    from transformers import AutoModelForCausalLM

    from hpc_rlhf.models.tiny import ensure_tiny_model
    model_path = ensure_tiny_model(tmp_path / "models")
    run_ranks(_worker, 2, (str(model_path), str(tmp_path)), timeout_s=240)
    counts = [json.loads((tmp_path / f"counts{r}.json").read_text()) for r in (0, 1)]
    assert counts[0]["final"] == counts[1]["final"] > 1       # equalised over the ranks
    assert counts[0]["local"] < counts[1]["local"]             # rank 0 had to split
    assert counts[0]["final"] == counts[1]["local"]
    got = torch.load(tmp_path / "grads.pt")

    model = AutoModelForCausalLM.from_pretrained(model_path)
    total = 0.0
    for rank in (0, 1):   # DeepSpeed averages the ranks' gradients
        batch, adv = rank_batch(rank)
        total = total + micro_loss(model, batch, adv) / 2
    total.backward()
    named = dict(model.named_parameters())
    for n in CHECKED:
        ref = named[n].grad
        assert ref.abs().max() > 1e-4, n                       # the check is not vacuous
        torch.testing.assert_close(got[n], ref, rtol=1e-4, atol=1e-6, msg=n)
