"""DeepSpeed strategy on 2 gloo ranks vs a plain single-process torch reference.

One spawned job runs every case in sequence (start-up dominates): ZeRO-1, ZeRO-2 with gradient
accumulation, ZeRO-3 with gradient checkpointing, and AutoTP size 2 (+ZeRO-1). Each case trains
the tiny Llama 5 steps; the reference is torch AdamW + clip_grad_norm_ + the same schedule,
written plainly below.
"""
import json
import math
import os
import time

import pytest
import torch

from testlib import scaled, spawn

pytestmark = [pytest.mark.distributed, pytest.mark.deepspeed]

STEPS, GLOBAL_BATCH, SEQ = 5, 4, 24
HP = dict(lr=2e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.01, max_grad_norm=0.5,
          warmup_steps=2, scheduler="cosine", total_steps=6, min_lr_ratio=0.1)
CASES = {  # name: (zero_stage, micro_batch_size, grad_accum, autotp_size, grad_ckpt)
    "zero1": (1, 2, 1, 1, False),
    "zero2_accum2": (2, 1, 2, 1, False),
    "zero3_ckpt": (3, 2, 1, 1, True),
    "autotp2_zero1": (1, 4, 1, 2, False),
}
LOSS_TOL = 2e-5     # absolute, per step (fp32; only the reduction order differs)
PARAM_TOL = 1e-4    # absolute, final weights after 5 Adam steps


def run_ranks(fn, world: int, args: tuple, timeout_s: float = 120.0) -> None:
    """Spawn `world` processes running fn(rank, world, port, *args); fail (not hang) past
    scaled(timeout_s). `port` is a TCPStore this process already hosts (testlib.spawn): no
    port is found free here and bound later by a rank."""
    spawn(fn, world, args, timeout_s)


def init_rank(rank: int, world: int, port: int) -> None:
    """The torchrun-like environment of a spawned rank; DeepSpeed's env:// init joins the
    parent's store at `port` as a client."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)


def batches(steps=STEPS):
    """Two fixed batches, alternating: the model memorises them, so the loss visibly falls."""
    g = torch.Generator().manual_seed(1234)
    pool = torch.randint(7, 100, (2, GLOBAL_BATCH, SEQ), generator=g)
    return [pool[s % 2] for s in range(steps)]


def _trajectory_worker(rank, world, port, model_path, out_dir):
    init_rank(rank, world, port)
    from transformers import AutoModelForCausalLM

    from hpc_rlhf.engine.deepspeed_strategy import DeepSpeedStrategy, StrategyConfig
    results = {}
    for name, (stage, mb, ga, tp, ckpt) in CASES.items():
        cfg = StrategyConfig(zero_stage=stage, micro_batch_size=mb, grad_accum=ga, autotp_size=tp,
                             gradient_checkpointing=ckpt, **HP)
        strat = DeepSpeedStrategy(cfg)
        strat.setup_distributed()
        t0 = time.perf_counter()
        engine = strat.prepare_model(AutoModelForCausalLM.from_pretrained(model_path))
        engine.train()
        t1 = time.perf_counter()
        per_rank = GLOBAL_BATCH // strat.dp_size
        assert per_rank == mb * ga, (name, per_rank, mb, ga)
        losses = []
        for batch in batches():
            mine = batch[strat.dp_rank * per_rank:(strat.dp_rank + 1) * per_rank]
            total = 0.0
            for m in range(ga):
                x = mine[m * mb:(m + 1) * mb]
                loss = engine(input_ids=x, labels=x).loss
                strat.backward(loss, engine)
                strat.step(engine)
                total += loss.item() / ga
            losses.append(strat.all_reduce_mean(total))
        t2 = time.perf_counter()
        local_numel = sum(getattr(p, "ds_tensor", p).numel() for p in engine.module.parameters())
        state = dict(strat.gathered_state(engine))
        if rank == 0:
            torch.save(state, os.path.join(out_dir, f"{name}.pt"))
            results[name] = {"losses": losses, "prepare_s": t1 - t0, "step_s": (t2 - t1) / STEPS,
                             "lr": engine.get_lr()[0],
                             "local_numel": local_numel,
                             "full_numel": sum(t.numel() for t in state.values())}
        del engine
    if rank == 0:
        with open(os.path.join(out_dir, "results.json"), "w") as f:
            json.dump(results, f)


def reference_run(model_path):
    """Plain torch: full batch, AdamW, clip, warmup + cosine, no DeepSpeed."""
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(model_path)
    model.train()
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": HP["weight_decay"]},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=HP["lr"], betas=HP["betas"], eps=HP["eps"])

    def factor(s):
        if s < HP["warmup_steps"]:
            return (s + 1) / HP["warmup_steps"]
        frac = (s - HP["warmup_steps"]) / (HP["total_steps"] - HP["warmup_steps"])
        return HP["min_lr_ratio"] + (1 - HP["min_lr_ratio"]) * 0.5 * (1 + math.cos(math.pi * frac))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    losses = []
    for x in batches():
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), HP["max_grad_norm"])
        opt.step()
        sched.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses, dict(model.named_parameters()), sched.get_last_lr()[0]


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    from hpc_rlhf.models.tiny import ensure_tiny_model
    return ensure_tiny_model(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="module")
def trajectories(tiny_path, tmp_path_factory):
    out = tmp_path_factory.mktemp("traj")
    run_ranks(_trajectory_worker, 2, (str(tiny_path), str(out)), timeout_s=240)
    with open(out / "results.json") as f:
        results = json.load(f)
    return results, out


@pytest.fixture(scope="module")
def reference(tiny_path):
    return reference_run(tiny_path)


@pytest.mark.timeout(scaled(300))
@pytest.mark.parametrize("case", list(CASES))
def test_two_rank_trajectory_matches_single_process(case, trajectories, reference):
    results, out = trajectories
    ref_losses, ref_params, ref_lr = reference
    got = results[case]
    print(f"{case}: prepare {got['prepare_s']:.2f}s step {got['step_s']:.3f}s losses {got['losses']}")
    assert max(abs(a - b) for a, b in zip(got["losses"], ref_losses)) < LOSS_TOL, \
        (got["losses"], ref_losses)
    assert ref_losses[-1] < ref_losses[0] - 0.2  # the run trains at all
    assert got["lr"] == pytest.approx(ref_lr, rel=1e-6)
    if case.startswith(("zero3", "autotp")):  # ZeRO-3 / AutoTP really shard the weights
        assert got["local_numel"] <= 0.6 * got["full_numel"]
    else:
        assert got["local_numel"] == got["full_numel"]
    state = torch.load(out / f"{case}.pt")
    assert set(state) == set(ref_params)
    for name, p in ref_params.items():
        assert state[name].shape == p.shape, name
        torch.testing.assert_close(state[name], p.detach(), atol=PARAM_TOL, rtol=0, msg=name)
