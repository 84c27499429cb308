"""Offload then reload around a (pretend) rollout leaves training bit-identical."""
import json
import os

import pytest
import torch

from distlib import init_rank, run_ranks

pytestmark = [pytest.mark.distributed, pytest.mark.deepspeed]


def _offload_worker(rank, world, port, model_path, out_dir):
    init_rank(rank, world, port)
    from transformers import AutoModelForCausalLM

    from hpc_rlhf.engine.deepspeed_strategy import DeepSpeedStrategy, StrategyConfig
    from hpc_rlhf.engine.offload import offload_train_states, reload_train_states
    results = {}
    for stage in (2, 3):
        strat = DeepSpeedStrategy(StrategyConfig(zero_stage=stage, micro_batch_size=2, lr=1e-2))
        strat.setup_distributed()
        runs = {}
        for mode in ("plain", "offload"):
            engine = strat.prepare_model(AutoModelForCausalLM.from_pretrained(model_path))
            g = torch.Generator().manual_seed(0)
            losses, report = [], None
            for step in range(3):
                if mode == "offload" and step > 0:
                    report = offload_train_states(engine, force_copy=True)
                    reload_train_states(engine, report)
                x = torch.randint(7, 100, (2, 16), generator=g)
                loss = engine(input_ids=x, labels=x).loss
                strat.backward(loss, engine)
                strat.step(engine)
                losses.append(loss.item())
            state = {n: t.tolist() for n, t in strat.gathered_state(engine) if "norm" in n}
            runs[mode] = {"losses": losses, "state": state,
                          "bytes": report.bytes if report else None,
                          "method": report.method if report else None,
                          "numel": sum(len(v) for v in state.values())}
        n = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(model_path).parameters())
        runs["numel"] = n
        results[stage] = runs
    with open(os.path.join(out_dir, "offload.json"), "w") as f:
        json.dump(results, f)


@pytest.mark.timeout(300)
def test_offload_reload_bit_identical(tmp_path):
    from hpc_rlhf.models.tiny import ensure_tiny_model
    path = ensure_tiny_model(tmp_path / "models")
    run_ranks(_offload_worker, 1, (str(path), str(tmp_path)), timeout_s=200)
    results = json.loads((tmp_path / "offload.json").read_text())
    for stage, runs in results.items():
        plain, off = runs["plain"], runs["offload"]
        assert off["losses"] == plain["losses"], stage
        assert off["state"] == plain["state"], stage
        assert off["method"] == "fallback"
        n = runs["numel"]
        # fp32 everywhere: Adam exp_avg + exp_avg_sq, fp32 master copy, the params themselves.
        # (ZeRO-1/2 in fp32 keep the master partition as the param itself: counted once.)
        assert off["bytes"]["optim_states"] == 2 * 4 * n, (stage, off["bytes"])
        assert off["bytes"]["lp_params"] + off["bytes"]["hp_params"] >= 4 * n, off["bytes"]
