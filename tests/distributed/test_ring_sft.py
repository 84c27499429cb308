"""SFT with train.ring_attn_size=2 is a config change: same loss trajectory as ring size 1.

Two gloo ranks build the launcher's Topology and run the SFT recipe's `run(cfg, topo, run_dir)`
(DeepSpeed ZeRO-3, tiny Llama, generated "reverse a word" data) on the same global batches:
  ring1:        ring 1, 2 data-parallel ranks, each trains 1 micro-batch of 4 samples per step;
  ring2:        ring 2 from topo.sp_group: 1 ring of 2 ranks, both read the same 2 micro-batches
                per step, each packed into one row split over the ring; loss x 2 in backward
                because DeepSpeed averages gradients over both ranks;
  ring2_notopo: the same with topo=None (ring_sft.new_ring_group builds the group) and
                gradient checkpointing on.
The optimizer sees the mean of the same 2 micro-batch gradients in every run, so the 5-step
loss trajectories (and the eval losses before and after) must agree. Tolerance: relative 1e-5
(fp32, different reduction orders; measured ~5e-8). Step 0's loss is also checked against a
naive per-sample full-attention NLL written in this file (relative 1e-5).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from distlib import ROOT
from testlib import scaled, spawn

STEPS, BATCH, MICRO = 5, 8, 4
REL_TOL_TRAJ, REL_TOL_REF = 1e-5, 1e-5


def _overrides(tmp: Path, ring: int) -> list[str]:
    return [f"data.prompts={tmp / 'data' / 'sft_train.jsonl'}",
            f"data.eval_prompts={tmp / 'data' / 'sft_eval.jsonl'}",
            f"train.ring_attn_size={ring}", f"train.num_steps={STEPS}",
            f"train.batch_size={BATCH}", f"train.micro_batch_size={MICRO}",
            "data.packing=false",  # ring 1 pads; ring 2 always packs one row per micro-batch
            "logging.log_every=100"]


def _worker(rank: int, world: int, port: int, tmp: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                      HPC_RLHF_CACHE=str(Path(tmp) / "cache"))
    torch.set_num_threads(1)
    from hpc_rlhf.config import load_config
    from hpc_rlhf.recipes import sft
    from hpc_rlhf.topology import Topology

    def cfg(ring, *extra):
        return load_config(ROOT / "configs" / "sft_tiny.yaml",
                           [*_overrides(Path(tmp), ring), *extra])

    topo = Topology.init(cfg(2))  # what hpc_rlhf.launch does: default world + dp/tp/sp groups
    # ring 1 baseline; ring 2 through topo.sp_group (launcher path); ring 2 without a topology
    # (ring_sft.new_ring_group on the default world) and with gradient checkpointing (the ring
    # scope must survive the recompute inside backward)
    runs = (("ring1", cfg(1), None), ("ring2", cfg(2), topo),
            ("ring2_notopo", cfg(2, "model.gradient_checkpointing=true"), None))
    for name, job_cfg, t in runs:
        t0 = time.time()
        sft.run(job_cfg, t, Path(tmp) / name)
        if rank == 0:
            (Path(tmp) / name / "wall_s").write_text(f"{time.time() - t0:.1f}")
    topo.destroy()


def _history(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _naive_step0_loss(tmp: Path) -> float:
    """Mean over the step's micro-batches of sum(-log p(target)) / #targets, one plain
    full-attention forward per sample, log-softmax by hand."""
    from transformers import AutoModelForCausalLM

    from hpc_rlhf.config import load_config
    from hpc_rlhf.data import load_samples, sft_sample, step_indices
    from hpc_rlhf.models.resolve import resolve_model_path
    from hpc_rlhf.recipes.common import chat_format, load_tokenizer
    cfg = load_config(ROOT / "configs" / "sft_tiny.yaml", _overrides(tmp, 1))
    tok = load_tokenizer(cfg.model.path)
    d = cfg.data
    samples, _ = load_samples(d.prompts, lambda row: sft_sample(
        row, chat_format(tok, d), d.input_key, d.output_key), max_len=d.max_len)
    model = AutoModelForCausalLM.from_pretrained(resolve_model_path(cfg.model.path),
                                                 dtype=torch.float32, attn_implementation="eager")
    idx = step_indices(len(samples), BATCH, 0, cfg.train.seed)
    losses = []
    with torch.no_grad():
        for start in range(0, BATCH, MICRO):
            nll, count = 0.0, 0
            for i in idx[start:start + MICRO]:
                ids = torch.tensor(samples[i].input_ids)
                logits = model(ids[None]).logits[0].double()  # [T, V]
                logp = logits - logits.exp().sum(-1, keepdim=True).log()
                for t in range(1, len(ids)):
                    if samples[i].loss_mask[t]:
                        nll -= logp[t - 1, ids[t]].item()
                        count += 1
            losses.append(nll / count)
    return sum(losses) / len(losses)


@pytest.mark.distributed
@pytest.mark.deepspeed
def test_sft_ring_size_2_matches_ring_size_1(tmp_path):
    from hpc_rlhf.data.synthetic import write_toy_datasets
    from hpc_rlhf.models.resolve import cache_dir
    from hpc_rlhf.models.tiny import ensure_tiny_model
    write_toy_datasets(tmp_path / "data", n_train=64, n_eval=8)
    old = os.environ.get("HPC_RLHF_CACHE")
    os.environ["HPC_RLHF_CACHE"] = str(tmp_path / "cache")  # private: others may rebuild theirs
    try:
        ensure_tiny_model(cache_dir() / "models", arch="llama")  # built before the ranks race
        t0 = time.time()
        spawn(_worker, 2, (str(tmp_path),), timeout_s=240)
        spawn_s = time.time() - t0
        naive = _naive_step0_loss(tmp_path)
    finally:
        if old is None:
            os.environ.pop("HPC_RLHF_CACHE", None)
        else:
            os.environ["HPC_RLHF_CACHE"] = old
    runs = {name: _history(tmp_path / name) for name in ("ring1", "ring2", "ring2_notopo")}
    train = {k: [r["loss"] for r in h if r["step"] > 0] for k, h in runs.items()}
    evals = {k: [r["eval_loss"] for r in h if "eval_loss" in r] for k, h in runs.items()}
    walls = {k: (tmp_path / k / "wall_s").read_text() for k in runs}
    base = train["ring1"] + evals["ring1"]
    worst = {k: max(abs(a - b) / abs(a) for a, b in zip(base, train[k] + evals[k]))
             for k in ("ring2", "ring2_notopo")}
    print(f"\ntrain {train}\neval {evals}\nnaive step0 {naive:.6f}\nmax rel diff {worst}"
          f"\nrun wall s {walls}; spawn + 3 runs {spawn_s:.1f} s")
    assert all(len(v) == STEPS for v in train.values()), train
    assert all(len(v) == 2 for v in evals.values()), evals
    train1 = train["ring1"]
    assert train1[-1] < train1[0]  # it trains (lr 3e-3), so the comparison is not vacuous
    for name in ("ring2", "ring2_notopo"):
        for step, (a, b) in enumerate(zip(train1, train[name])):
            assert abs(a - b) <= REL_TOL_TRAJ * abs(a), f"{name} step {step}: ring 1 {a} vs {b}"
        for a, b in zip(evals["ring1"], evals[name]):
            assert abs(a - b) <= REL_TOL_TRAJ * abs(a), f"{name} eval: ring 1 {a} vs {b}"
    for got in (train1[0], train["ring2"][0]):
        assert abs(got - naive) <= REL_TOL_REF * naive, f"step 0 loss {got} vs naive {naive}"


@pytest.mark.unit
@pytest.mark.parametrize("tp,ring,n", [(1, 2, 2), (1, 2, 4), (2, 2, 8), (1, 4, 8), (2, 4, 16)])
def test_ring_groups_and_data_ranks_match_the_topology_layout(tp, ring, n):
    """Without a Topology the trainer builds ring groups itself: same members and data-parallel
    coordinates as the topology's layout (which the launcher uses)."""
    from hpc_rlhf.config import load_config
    from hpc_rlhf.engine.ring_sft import ring_dp_coords, ring_group_ranks
    from hpc_rlhf.topology.layout import build_layout
    cfg = load_config(ROOT / "configs" / "sft_tiny.yaml", [
        f"topology.procs_per_node={n}", f"train.autotp_size={tp}", f"train.ring_attn_size={ring}",
        "train.zero_stage=2", "train.micro_batch_size=1", f"train.batch_size={n}"])
    lay = build_layout(cfg)
    assert ring_group_ranks(n, ring, tp) == lay.subgroups("all", "sp")
    for info in lay.ranks:
        assert ring_dp_coords(info.world_rank, n, ring, tp) == (info.dp_rank, lay.dp_size)


@pytest.mark.unit
def test_one_row_packing_and_labels_follow_the_batch_convention():
    """The ring path's one packed row + next-token labels select the same (position, target)
    pairs as the padded batch's loss_mask, written out by hand here."""
    from hpc_rlhf.data.samples import SFTSample
    from hpc_rlhf.engine.ring_sft import next_token_labels, one_row_batch
    samples = [SFTSample([5, 6, 7, 8], [0, 0, 1, 1]), SFTSample([9, 10, 11], [0, 1, 1])]
    batch, cu = one_row_batch(samples, pad_id=0)
    assert cu == [0, 4, 7] and batch.input_ids.tolist() == [[5, 6, 7, 8, 9, 10, 11]]
    # targets: 7 after 6, 8 after 7 (sample 0); 10 after 9, 11 after 10 (sample 1)
    assert next_token_labels(batch).tolist() == [[-100, 7, 8, -100, 10, 11, -100]]
    with pytest.raises(ValueError, match="ring_attn_size=2 x train.autotp_size=1 must divide"):
        from hpc_rlhf.engine.ring_sft import ring_group_ranks
        ring_group_ranks(3, 2, 1)


# make_strategy on a world of 3 with no default process group: run in a fresh interpreter,
# since the pytest process may already hold a default group (an in-process vLLM engine makes a
# world of 1), and then make_strategy would read that world's size instead of WORLD_SIZE.
_WORLD_OF_3 = """
import sys
import torch.distributed as dist
from hpc_rlhf.config import load_config
from hpc_rlhf.recipes.common import make_strategy
assert not dist.is_initialized()
cfg = load_config(sys.argv[1], ["train.ring_attn_size=2"])
try:
    make_strategy(cfg, ring=True)
except ValueError as e:
    print(e)
    sys.exit(0)
sys.exit("make_strategy accepted rings of 2 in a world of 3")
"""


@pytest.mark.unit
def test_recipes_without_a_ring_path_refuse_ring_size_above_1():
    """Other recipes would silently train without the ring (and with the wrong grad_accum)."""
    from hpc_rlhf.config import ConfigError, load_config
    # Refused by the config, before any job is queued ...
    with pytest.raises(ConfigError, match="not train.trainer='csft'; set train.ring_attn_size=1"):
        load_config(ROOT / "configs" / "csft_tiny.yaml", ["train.ring_attn_size=2"])


@pytest.mark.unit
def test_ring_recipe_refuses_a_world_its_rings_do_not_divide():
    """A world of 3 ranks (torchrun's WORLD_SIZE, no process group yet) cannot hold rings of 2."""
    keep = {k: v for k, v in os.environ.items()
            if k not in ("RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                         "TORCHELASTIC_USE_AGENT_STORE")}
    config = ROOT / "configs" / "sft_tiny.yaml"
    proc = subprocess.run([sys.executable, "-c", _WORLD_OF_3, str(config)],
                          env={**keep, "WORLD_SIZE": "3"}, cwd=ROOT, capture_output=True,
                          text=True, timeout=scaled(120))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "= 2 must divide the 3 training ranks" in proc.stdout, proc.stdout
