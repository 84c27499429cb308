"""Round checkpoints of the generating trainers (rejection sampling, iterative DPO): 2 CPU
ranks, ZeRO-3, tiny Llama, colocated HF rollout engines (rollout.engine=hf), `repeat` task:

- an uninterrupted run of ROUNDS rounds, then, in the same processes, a run where rank 1
  alone is warned (as by SLURM's SIGUSR1) during round WARN_AT - 1: both ranks stop after it,
  save checkpoint WARN_AT, rank 0 writes REQUEUE, no HF export;
- the requeued run in the same directory resumes from round WARN_AT: every metric of its
  rounds (rewards of the candidates it samples, the SFT / DPO losses) equals the uninterrupted
  run's, which needs the policy engine, its optimizer and LR schedule, the prompt cursor and
  the rollout replica's weights (reloaded from the restored policy) all restored.

Also the stop vote those loops (and rl/loop.py, rl/disaggregated.py) share,
signals.agreed_stop_vote, over the default world and over a standalone gloo group.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from distlib import ROOT
from testlib import spawn

pytestmark = [pytest.mark.distributed, pytest.mark.deepspeed]

ROUNDS, WARN_AT, TIMEOUT_S = 3, 1, 240
RECIPES = {  # name: (module, config, overrides)
    "rs": ("hpc_rlhf.recipes.rejection_sampling", "rs_tiny", ["train.actor_lr=1e-2"]),
    "idpo": ("hpc_rlhf.recipes.iterative_dpo", "iterative_dpo_tiny", ["train.actor_lr=3e-3"]),
}
SMALL = ["rollout.engine=hf", f"train.num_steps={ROUNDS}", "rollout.prompts_per_step=8",
         "train.rs_candidates=8", "train.batch_size=8", "train.micro_batch_size=4",
         "train.epochs_per_step=2", "logging.log_every=1000", "checkpoint.export_hf=true"]


def _worker(rank: int, world: int, port: int, tmp: str, recipe: str, runs: tuple) -> None:
    """runs: ((run name, warn rank 1 at the end of this round or 0), ...), in order."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                      HPC_RLHF_CACHE=str(Path(tmp) / "cache"))
    import torch
    import torch.distributed as dist
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from hpc_rlhf.config import load_config
    from hpc_rlhf.runtime import signals
    from hpc_rlhf.runtime import StepCheckpoints
    module, config, extra = RECIPES[recipe]
    original = StepCheckpoints.after_step
    for name, warn_at in runs:
        if warn_at and rank == 1:  # only rank 1 hears the warning, during round `warn_at`
            def after_step(self, done_steps, *args, **kwargs):
                if done_steps == warn_at:
                    signals.request_checkpoint()
                return original(self, done_steps, *args, **kwargs)
            StepCheckpoints.after_step = after_step
        cfg = load_config(ROOT / "configs" / f"{config}.yaml", [*SMALL, *extra])
        t0 = time.time()
        __import__(module, fromlist=["run"]).run(cfg, None, Path(tmp) / name)
        if rank == 0:
            (Path(tmp) / f"{name}.wall_s").write_text(f"{time.time() - t0:.1f}\n")
    dist.destroy_process_group()


def _rounds(run_dir: Path) -> dict[int, dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in rows}


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_warned_rank_checkpoints_round_requeues_and_resume_matches(tmp_path, recipe):
    from hpc_rlhf.checkpoint.store import list_checkpoints
    from hpc_rlhf.models.tiny import ensure_tiny_model
    ensure_tiny_model(tmp_path / "cache" / "models", arch="llama")  # before the ranks race
    t0 = time.time()
    spawn(_worker, 2, (str(tmp_path), recipe,
                       (("whole", 0), ("preempted", WARN_AT))), TIMEOUT_S)
    whole = _rounds(tmp_path / "whole")
    assert sorted(whole) == list(range(1, ROUNDS + 1))   # 1-based: after k rounds
    assert [s for s, _ in list_checkpoints(tmp_path / "whole" / "checkpoints")] == [ROUNDS]
    assert (tmp_path / "whole" / "export").is_dir()

    run = tmp_path / "preempted"
    assert sorted(_rounds(run)) == list(range(1, WARN_AT + 1))  # both ranks stopped after it
    assert [s for s, _ in list_checkpoints(run / "checkpoints")] == [WARN_AT]
    assert (run / "REQUEUE").exists()                       # rank 0 knew rank 1 was warned
    assert not (run / "export").exists()                        # no export of an unfinished run
    (run / "REQUEUE").unlink()                              # what the launcher does

    spawn(_worker, 2, (str(tmp_path), recipe, (("preempted", 0),)), TIMEOUT_S)
    resumed = _rounds(run)
    assert sorted(resumed) == list(range(1, ROUNDS + 1))
    assert [s for s, _ in list_checkpoints(run / "checkpoints")] == [WARN_AT, ROUNDS]
    loss = "sft/loss_last" if recipe == "rs" else "dpo/loss_last"
    assert all(loss in whole[r] for r in range(1, ROUNDS + 1)), whole  # every round trained
    for r in range(1, ROUNDS + 1):   # rounds before the stop ran once; later ones after the resume
        assert resumed[r].keys() == whole[r].keys(), (r, resumed[r], whole[r])
        for k, v in whole[r].items():
            assert resumed[r][k] == pytest.approx(v, rel=1e-6, abs=1e-7), (r, k, resumed, whole)
    assert (run / "export").is_dir() and not (run / "REQUEUE").exists()
    walls = {n: (tmp_path / f"{n}.wall_s").read_text().strip() for n in ("whole", "preempted")}
    print(f"\n{recipe}: {time.time() - t0:.1f} s in all; run walls {walls}")


GRACE_S = 3.0


def _vote_worker(rank: int, world: int, port: int, tmp: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    os.environ.pop("SLURM_JOB_ID", None)  # request_requeue: no scontrol, warnings only
    import signal
    from datetime import timedelta

    import torch.distributed as dist
    from hpc_rlhf.runtime import signals
    signals.install(grace_s=GRACE_S)  # SIGTERM: hard exit unless agreed
    dist.init_process_group("gloo", rank=rank, world_size=world)
    # a standalone group on a PrefixStore of the job's store, as topology/groups builds its job
    # group: here a client of the TCPStore that spawn hosts (no second port)
    store = dist.PrefixStore("job", dist.TCPStore("127.0.0.1", port, world, False,
                                                  timeout=timedelta(seconds=60)))
    job = dist.ProcessGroupGloo(store, rank, world, timedelta(seconds=60))

    def votes() -> tuple[int, int]:
        return signals.agreed_stop_vote(), signals.agreed_stop_vote(job)

    assert votes() == (0, 0)
    dist.barrier()
    if rank == world - 1:  # the last rank alone gets SIGTERM (e.g. a dead peer's, scancel)
        os.kill(os.getpid(), signal.SIGTERM)
        while not signals.checkpoint_requested():
            time.sleep(0.01)
    dist.barrier()
    assert votes() == (signals.STOP_TERM,) * 2, rank
    time.sleep(GRACE_S + 0.5)  # the vote ran stop_agreed: the watchdog must not fire
    assert signals.request_requeue(Path(tmp) / f"term{rank}") is None  # SIGTERM only
    if rank == world - 1:
        signals.request_checkpoint()     # then a warning (SIGUSR1) on that rank only
    dist.barrier()
    assert votes() == (signals.STOP_WARNED,) * 2, rank
    # every rank now knows a peer was warned: rank 0 would write the REQUEUE marker
    assert signals.request_requeue(Path(tmp) / f"warned{rank}") is not None, rank
    dist.barrier()
    dist.destroy_process_group()


def test_agreed_stop_vote_is_the_max_over_the_world_and_a_standalone_group(tmp_path):
    """0 with no signal; STOP_TERM on every rank when one got SIGTERM (which the vote
    agrees, so that rank's SIGTERM watchdog does not hard-exit it after its grace; no requeue
    outside SLURM); STOP_WARNED on every rank once one was warned, and then request_requeue
    writes the marker on any rank."""
    spawn(_vote_worker, 2, (str(tmp_path),), 60)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["warned0", "warned1"]
