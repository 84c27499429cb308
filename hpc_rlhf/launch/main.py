"""The rank entry point: every rank of every launcher runs this.

    python -m hpc_rlhf.launch.main --config configs/X.yaml [key=value ...] [--program NAME]

Steps: install signal handlers -> load + validate config -> build the Topology (process
groups) -> prepare the run directory (config.yaml, layout.txt, logs/rank<R>.log) -> run the
program -> destroy the groups.

Program: `--program NAME`, else $HPC_RLHF_PROGRAM, else train.trainer. Each program is a
function `run(cfg: JobConfig, topo: Topology, run_dir: Path) -> None` named in PROGRAMS as
"module:function" and imported only when chosen (so a missing trainer module fails with a
clear error, and heavy imports stay out of other programs). "smoke" is a plain
torch.distributed workload for launcher tests (launch/smoke_roles.py).

Contract for programs: once per step call `signals.agreed_stop_vote()` on every rank (the MAX
of `stop_vote()` over the ranks; it calls `stop_agreed` itself); when it is non-zero save, have
global rank 0 call `signals.request_requeue(run_dir)` (it decides whether a requeue is
wanted), pass a barrier, return (rl/loop.py and runtime.StepCheckpoints are the
models). Resume from run_dir on start. Raise on errors (do not sys.exit): torchrun's error
summary then names the rank and shows the traceback.
"""
from __future__ import annotations

import argparse
import faulthandler
import importlib
import os
import sys
import time
from typing import Callable

from hpc_rlhf.runtime import signals

PROGRAMS: dict[str, str] = {
    "rl": "hpc_rlhf.recipes.rl.loop:run",
    "sft": "hpc_rlhf.recipes.sft:run",
    "rm": "hpc_rlhf.recipes.rm:run",
    "prm": "hpc_rlhf.recipes.prm:run",
    "dpo": "hpc_rlhf.recipes.dpo:run",
    "kto": "hpc_rlhf.recipes.kto:run",
    "kd": "hpc_rlhf.recipes.kd:run",
    "csft": "hpc_rlhf.recipes.csft:run",
    "rejection_sampling": "hpc_rlhf.recipes.rejection_sampling:run",
    "iterative_dpo": "hpc_rlhf.recipes.iterative_dpo:run",
    "eval": "hpc_rlhf.recipes.rl.evaluate:run",
    "smoke": "hpc_rlhf.launch.smoke_roles:run",
}
ENV_PROGRAM = "HPC_RLHF_PROGRAM"


class ProgramError(RuntimeError):
    pass


def resolve_program(name: str) -> Callable:
    """PROGRAMS[name] imported; a clear error when unknown or not written yet."""
    if name not in PROGRAMS:
        raise ProgramError(f"program {name!r} is unknown; choose one of {sorted(PROGRAMS)} "
                           f"(--program / ${ENV_PROGRAM} / train.trainer)")
    module, func = PROGRAMS[name].split(":")
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name and module.startswith(e.name):
            raise ProgramError(f"program {name!r} lives in {module}, which does not exist (yet) "
                               "in this checkout; pick another train.trainer") from e
        raise
    if not hasattr(mod, func):
        raise ProgramError(f"{module} has no function {func}(cfg, topo, run_dir)")
    return getattr(mod, func)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m hpc_rlhf.launch.main",
                                description="Rank entry point (started by torchrun).")
    p.add_argument("--config", default=None, help="YAML config (default: built-in defaults)")
    p.add_argument("--program", default=None,
                   help=f"program to run: {', '.join(PROGRAMS)} (default: ${ENV_PROGRAM}, "
                        "else train.trainer)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.num_steps=5")
    return p.parse_args(argv)


def _log(rank: int, msg: str) -> None:
    print(f"[rank {rank}] {msg}", flush=True)


def _quiet_libraries() -> None:
    """vLLM logs every engine step at INFO and torch warns about its own deprecations on every
    collective; keep the console for our progress and errors (users can raise them again)."""
    import warnings
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed")
    warnings.filterwarnings("ignore", message=r".*torch\.distributed\..* is deprecated.*")


def main(argv: list[str] | None = None) -> int:
    signals.install()
    faulthandler.enable()  # segfaults print Python stacks
    _quiet_libraries()
    args = parse_args(argv)
    from hpc_rlhf.config import ConfigError, load_config

    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(e, file=sys.stderr)
        return 2
    name = args.program or os.environ.get(ENV_PROGRAM) or cfg.train.trainer
    program = resolve_program(name)

    from hpc_rlhf.config.rules import GENERATING_TRAINERS
    from hpc_rlhf.launch.rundir import (RerunRefused, check_rerun, claim_run_dir, clear_failure,
                                        prepare_run_dir, record_failure, resolve_run_dir,
                                        tee_rank_logs)
    from hpc_rlhf.topology import Topology
    first = os.environ.get("RANK", "0") == "0"
    try:  # the same verdict on every rank (they read the same files): no world needed
        if first:  # one job per run directory (rank 0 decides; torchrun stops the others)
            claim_run_dir(resolve_run_dir(cfg), os.environ.get("SLURM_JOB_ID", ""))
        finished = check_rerun(cfg)
    except RerunRefused as e:
        if first:
            print(e, file=sys.stderr)
        return 2
    if finished:
        if first:
            print(finished, flush=True)
        return 0

    t0 = time.monotonic()
    topo = Topology.init(cfg)
    run_dir = prepare_run_dir(cfg, topo.layout.describe(), topo.rank)
    tee_rank_logs(run_dir, topo.rank)
    _log(topo.rank, f"{'+'.join(topo.roles)} world {topo.info.world!r} "
                    f"{topo.world_rank}/{topo.info.world_size}; groups ready in "
                    f"{time.monotonic() - t0:.1f}s; program {name!r}; run dir {run_dir}")
    clear_failure(run_dir, topo.rank)
    try:
        if topo.rank == 0 and cfg.reward.source == "remote" and name in (*GENERATING_TRAINERS,
                                                                        "eval"):
            from hpc_rlhf.rewards.remote import probe_servers  # before any model loads
            probe_servers(cfg.reward.remote_url, cfg.reward.remote_timeout_s)
        program(cfg, topo, run_dir)
    except Exception as e:
        record_failure(run_dir, topo.rank, e)
        raise
    finally:
        if signals.received_signals() and (topo.rank != 0 or not signals.stop_was_agreed()):
            # rank 0's closing line names its own signals when the program acted on them
            _log(topo.rank, f"signals received: {signals.received_signals()}")
    topo.destroy()
    return 0


def entry() -> None:
    from torch.distributed.elastic.multiprocessing.errors import record

    from hpc_rlhf.topology.collectives import end_process

    # record: an exception's traceback goes to torchrun's error file, which its failure
    # summary prints with the rank that raised it. A returned rank ends through end_process:
    # no interpreter finalization, where a leftover gloo group can abort or hang a finished
    # rank.
    end_process(record(main)())


if __name__ == "__main__":
    entry()
