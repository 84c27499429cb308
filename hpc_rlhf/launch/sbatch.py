"""Render the plain-sbatch job script: one `srun` task per node, each running one torchrun agent.

The checked-in scripts under slurm/ are exactly `render_sbatch(SCRIPTS[name])`
(tests/unit/test_sbatch_render.py guards that); regenerate them after a template change with

    python -m hpc_rlhf.launch.sbatch --write        # rewrites slurm/*.sbatch
    python -m hpc_rlhf.launch.sbatch --check        # exit 1 if a checked-in script is stale
    python -m hpc_rlhf.launch.sbatch grpo_7b        # print one script

The dry-run planner prints `render_sbatch(spec)` for the job it plans.

Preemption contract (between this script and the program it runs):
  1. SLURM sends SIGUSR1 to the batch shell `signal_lead_s` seconds before the time limit
     (`--signal=B:USR1@N`), or an operator does `scancel --signal=USR1 --batch JOBID`.
  2. The batch shell forwards SIGUSR1 to srun, srun to every task; torchrun (told to handle
     SIGUSR1) forwards it to its ranks and waits up to `--shutdown-timeout` for them.
     A rank may see the signal twice (from the step and from torchrun): handle it idempotently.
  3. The program saves a checkpoint under $HPC_RLHF_RUN_DIR, then rank 0 writes the empty file
     $HPC_RLHF_RUN_DIR/REQUEUE, all ranks pass a barrier and exit (any exit code).
  4. After srun returns, the batch shell requeues the job (`scontrol requeue $SLURM_JOB_ID`)
     iff REQUEUE exists (and deletes it). The next run sees SLURM_RESTART_COUNT>=1 and the
     program resumes from its latest checkpoint in $HPC_RLHF_RUN_DIR.
"""
from __future__ import annotations

import argparse
import re
import shlex
import sys
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

_TIME_RE = re.compile(r"^(\d+-)?\d{1,2}:\d{2}:\d{2}$")
_NAME_RE = re.compile(r"^[A-Za-z0-9_.-]+$")


@dataclass(frozen=True)
class SbatchSpec:
    """What varies between job scripts; everything else is the shared template."""

    job_name: str  # SLURM job name (%x in the log file name) and default run dir name
    nodes: int  # whole nodes; one torchrun agent per node
    gpus_per_node: int  # GPUs per node; 0 means a CPU job (gloo), no GPU request
    nproc_per_node: int  # ranks per node (torchrun --nproc-per-node); = gpus_per_node on GPU
    cpus_per_task: int  # CPUs for the one task per node; 0: none asked, it gets the job's all
    time: str  # wall-clock limit, [D-]HH:MM:SS
    config: str | None = None  # YAML config passed as --config; None: the module takes none
    module: str = "hpc_rlhf.launch.main"  # python -m entry point every rank runs
    overrides: tuple[str, ...] = ()  # dotted overrides baked into the script (key=value)
    partition: str | None = None  # --partition; None: the cluster's default
    account: str | None = None  # --account; None: the user's default
    qos: str | None = None  # --qos; None: the default
    mem: str = "0"  # --mem per node; "0": all of it (always requested on GPU nodes)
    run_dir: str | None = None  # checkpoints + REQUEUE marker; None: runs/<job_name>
    signal_lead_s: int = 300  # SIGUSR1 this many seconds before the time limit
    output: str = "%x-%j.out"  # log file (relative to the submit dir; sbatch makes no dirs)
    description: str = ""  # one line at the top of the script
    extra_env: tuple[tuple[str, str], ...] = field(default=())  # exported NAME=value lines
    setup: tuple[str, ...] = ()  # shell lines run before anything else (module load, venv)
    requeue: bool = True  # False: --no-requeue (the program then writes no REQUEUE marker)
    max_restarts: int = 0  # torchrun --max-restarts
    check_config: bool = True  # run `config check --in-job` first (hpc_rlhf.launch.main only)

    def __post_init__(self) -> None:
        errors = []
        if not _NAME_RE.match(self.job_name):
            errors.append(f"job_name={self.job_name!r} must match {_NAME_RE.pattern}")
        if self.nodes < 1:
            errors.append(f"nodes={self.nodes} must be >= 1")
        if self.gpus_per_node < 0:
            errors.append(f"gpus_per_node={self.gpus_per_node} must be >= 0 (0 = CPU job)")
        if self.nproc_per_node < 1:
            errors.append(f"nproc_per_node={self.nproc_per_node} must be >= 1")
        if self.gpus_per_node and self.nproc_per_node != self.gpus_per_node:
            errors.append(
                f"nproc_per_node={self.nproc_per_node} must equal gpus_per_node="
                f"{self.gpus_per_node} (one rank per GPU); set them equal"
            )
        if self.cpus_per_task < 0:
            errors.append(f"cpus_per_task={self.cpus_per_task} must be >= 0 (0: no request)")
        if self.max_restarts < 0:
            errors.append(f"max_restarts={self.max_restarts} must be >= 0")
        if any("\n" in line for line in self.setup):
            errors.append("setup lines must be single lines")
        if not _TIME_RE.match(self.time):
            errors.append(f"time={self.time!r} must look like [D-]HH:MM:SS, e.g. 04:00:00")
        if not 60 <= self.signal_lead_s <= 65535:
            errors.append(
                f"signal_lead_s={self.signal_lead_s} must be in [60, 65535]: SLURM may send "
                "the signal up to 60 s early and the program needs time to checkpoint"
            )
        for o in self.overrides:
            if "=" not in o or any(c in o for c in " '\"$`\\"):
                errors.append(f"override {o!r} must be key=value without spaces, quotes or $")
        if errors:
            raise ValueError("invalid SbatchSpec:\n  " + "\n  ".join(errors))

    @property
    def resolved_run_dir(self) -> str:
        return self.run_dir or f"runs/{self.job_name}"

    @property
    def shutdown_timeout_s(self) -> int:
        # torchrun waits this long for ranks after forwarding SIGUSR1; keep 60 s of the lead
        # for requeue bookkeeping and SLURM's up-to-60-s early signal.
        return max(30, self.signal_lead_s - 60)


def _header(s: SbatchSpec) -> list[str]:
    lines = [
        "# Job name: the log file is <name>-<jobid>.out (%x-%j below).",
        f"#SBATCH --job-name={s.job_name}",
        "# Whole nodes; each runs ONE task (a torchrun agent) that spawns the per-node ranks.",
        "# Never combine --ntasks-per-node=<gpus> with torchrun: that double-spawns ranks.",
        f"#SBATCH --nodes={s.nodes}",
        "#SBATCH --ntasks-per-node=1",
    ]
    if s.gpus_per_node:
        lines += [
            "# GPUs per node; torchrun starts one rank per GPU (--nproc-per-node below).",
            f"#SBATCH --gpus-per-node={s.gpus_per_node}",
            "# Nodes are not shared with other jobs" + (
                ", and the job may use all their memory." if s.mem == "0" else "; memory per node."),
            "#SBATCH --exclusive",
            f"#SBATCH --mem={s.mem}",
        ]
    elif s.mem != "0":
        lines += ["# Memory per node.", f"#SBATCH --mem={s.mem}"]
    if s.cpus_per_task:
        lines += [
            "# CPUs for the node's task: ranks, data loader workers, rollout/reward CPU work.",
            f"#SBATCH --cpus-per-task={s.cpus_per_task}",
        ]
    else:
        lines += ["# No --cpus-per-task (launch.cpus_per_node=0): the node's task gets every CPU",
                  "# the job holds there (srun below)."]
    lines += [
        "# Wall-clock limit, [D-]HH:MM:SS.",
        f"#SBATCH --time={s.time}",
    ]
    for flag, value, doc in (("partition", s.partition, "Partition (queue)."),
                             ("account", s.account, "Account charged for the job."),
                             ("qos", s.qos, "Quality of service.")):
        if value:
            lines += [f"# {doc}", f"#SBATCH --{flag}={value}"]
    lines += [
        f"# SIGUSR1 to this batch shell (B:) {s.signal_lead_s} s before the time limit; the",
        "# trap below forwards it to the ranks, which checkpoint (contract at the bottom).",
        f"#SBATCH --signal=B:USR1@{s.signal_lead_s}",
    ]
    lines += (["# The job may be requeued (by this script, node failure or preemption).",
               "#SBATCH --requeue"] if s.requeue else
              ["# launch.requeue=false: a signal checkpoints and ends the job; never requeued.",
               "#SBATCH --no-requeue"])
    lines += [
        "# One job per name at a time: a second submission of this run waits for the first",
        "# (both would write the same run directory).",
        "#SBATCH --dependency=singleton",
        "# Log file, relative to the submit directory (sbatch does not create directories);",
        "# a requeued run appends to the same file.",
        f"#SBATCH --output={s.output}",
        "#SBATCH --open-mode=append",
    ]
    return lines


def render_sbatch(s: SbatchSpec) -> str:
    """The full job script text for `s` (deterministic: equal specs give equal text)."""
    desc = "".join(f"# {line}\n" for line in textwrap.wrap(s.description, 94))
    if s.module == "hpc_rlhf.launch.main":
        args_doc = "Extra arguments are dotted config overrides (key=value), passed to every rank."
    else:
        args_doc = f"Extra arguments are passed to every rank's `python -m {s.module}`."
    config_arg = f' --config "$CONFIG"' if s.config else ""
    overrides = "".join(f" {o}" for o in s.overrides)
    return f"""#!/bin/bash
{desc}# Rendered by hpc_rlhf/launch/sbatch.py; edit there and run
# `python -m hpc_rlhf.launch.sbatch --write`, not this file.
#
# Submit from the repository root:  sbatch slurm/{s.job_name}.sbatch [args ...]
# {args_doc}
# Overrides given here cannot change the #SBATCH header; `python -m hpc_rlhf.submit --sbatch`
# (with the config and overrides) checks them before queueing and renders the header from them.
{chr(10).join(_header(s))}

set -uo pipefail

{_prologue(s, config_arg, overrides)}
{_launch_section(s, config_arg, overrides)}"""


def _prologue(s: SbatchSpec, config_arg: str, overrides: str) -> str:
    """Knobs, the user's set-up lines and environment, the run directory, the config check."""
    config_var = f'CONFIG=${{CONFIG:-{s.config}}}\n' if s.config else ""
    setup = "".join(f"{line}\n" for line in s.setup)
    setup = f"# launch.setup: run before anything else.\n{setup}" if setup else ""
    from hpc_rlhf.launch.plan import torchrun_env
    env = "".join(f"export {k}={shlex.quote(v)}\n"
                  for k, v in (*s.extra_env, *torchrun_env(s.max_restarts).items()))
    check = ""
    if s.check_config and s.module == "hpc_rlhf.launch.main":
        check = f"""
# Check the config, its overrides and the files it names before any node starts: a typo or a
# missing file ends the job here in seconds, not after every node has loaded the models.
if ! NPROC_PER_NODE=$NPROC_PER_NODE "$PYTHON" -m hpc_rlhf.config check --in-job \\
        {"$CONFIG" if s.config else ""}{overrides} "$@"; then
    echo "[sbatch] the config check above failed; nothing was started" >&2
    exit 2
fi
"""
    return f"""# --- Knobs you can set at submit time:  VAR=value sbatch slurm/{s.job_name}.sbatch
{config_var}# Checkpoints, logs of the program and the REQUEUE marker live here.
RUN_DIR=${{RUN_DIR:-{s.resolved_run_dir}}}
# Each task of a job array (sbatch --array) gets a run directory of its own.
if [[ -n ${{SLURM_ARRAY_TASK_ID:-}} ]]; then RUN_DIR=$RUN_DIR/task_$SLURM_ARRAY_TASK_ID; fi
# Python with hpc_rlhf installed (activate your environment before sbatch, or set PYTHON).
PYTHON=${{PYTHON:-python}}
# Ranks per node.
NPROC_PER_NODE=${{NPROC_PER_NODE:-{s.nproc_per_node}}}
# Rendezvous port on the head node; derived from the job id so jobs sharing a node differ.
RDZV_PORT=${{RDZV_PORT:-$((20000 + SLURM_JOB_ID % 20000))}}
{setup}{env}
mkdir -p "$RUN_DIR"
export HPC_RLHF_RUN_DIR=$RUN_DIR
# A marker left by a killed run must not requeue this one.
rm -f "$RUN_DIR/REQUEUE"
{check}
# Rendezvous on the first node of the allocation, by the address SLURM itself uses for it.
head_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
head_addr=$(scontrol show node "$head_node" | sed -n 's/.*NodeAddr=\\([^ ]*\\).*/\\1/p')
head_addr=${{head_addr:-$head_node}}
echo "[sbatch] job $SLURM_JOB_ID restart ${{SLURM_RESTART_COUNT:-0}}: $SLURM_JOB_NUM_NODES nodes" \\
     "x $NPROC_PER_NODE ranks, rendezvous $head_addr:$RDZV_PORT, run dir $RUN_DIR"
"""


def _launch_section(s: SbatchSpec, config_arg: str, overrides: str) -> str:
    """The script from the USR1 trap on: srun -> torchrun -> ranks, then requeue or exit."""
    return f"""# SIGUSR1 (time limit near, or scancel --signal=USR1 --batch) -> srun -> torchrun -> ranks.
srun_pid=""
forward_usr1() {{
    echo "[sbatch] SIGUSR1: asking the ranks to checkpoint"
    [[ -n $srun_pid ]] && kill -USR1 "$srun_pid"
}}
trap forward_usr1 USR1

# One task per node, each a torchrun agent; c10d rendezvous (node ranks assigned by it).
# --kill-on-bad-exit: one failed agent ends the whole step instead of leaving peers hanging.
# --cpus-per-task again: since SLURM 22.05 srun does not inherit it from sbatch (the task
# would be bound to 1 CPU and every rank would share it). With no #SBATCH --cpus-per-task,
# every CPU the job holds on the node (SLURM_CPUS_ON_NODE, counted on the first node).
# is_host: the first node of the allocation hosts the rendezvous store, said explicitly (the
# hostname match torchrun falls back to fails where NodeAddr is a secondary interface).
# --signals-to-handle adds SIGUSR1 so torchrun forwards it instead of dying of it;
# --shutdown-timeout is how long torchrun then lets the ranks checkpoint before SIGKILL.
srun --kill-on-bad-exit=1 --nodes="$SLURM_JOB_NUM_NODES" --ntasks-per-node=1 \\
    --cpus-per-task="${{SLURM_CPUS_PER_TASK:-$SLURM_CPUS_ON_NODE}}" \\
    bash -c 'exec "$0" -m torch.distributed.run \\
        --rdzv-conf "is_host=$([[ $SLURM_NODEID == 0 ]] && echo true || echo false)" "$@"' \\
    "$PYTHON" --nnodes "$SLURM_JOB_NUM_NODES" --nproc-per-node "$NPROC_PER_NODE" \\
    --rdzv-backend c10d --rdzv-endpoint "$head_addr:$RDZV_PORT" --rdzv-id "$SLURM_JOB_ID" \\
    --max-restarts {s.max_restarts} \\
    --signals-to-handle SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1 \\
    --shutdown-timeout {s.shutdown_timeout_s} \\
    -m {s.module}{config_arg}{overrides} "$@" &
srun_pid=$!

# `wait` returns early when the trap runs; keep waiting until srun has really exited.
rc=0
wait "$srun_pid" || rc=$?
while kill -0 "$srun_pid" 2>/dev/null; do
    rc=0
    wait "$srun_pid" || rc=$?
done

# Contract with the program: after a signal-triggered checkpoint, rank 0 writes
# $HPC_RLHF_RUN_DIR/REQUEUE; we then requeue this job (same job id, SLURM_RESTART_COUNT+1)
# and the next run resumes from the checkpoint. No marker: the job ends with srun's status.
if [[ -f $RUN_DIR/REQUEUE ]]; then
    rm -f "$RUN_DIR/REQUEUE"
    echo "[sbatch] checkpoint written; requeueing job $SLURM_JOB_ID"
    if ! scontrol requeue "$SLURM_JOB_ID"; then
        echo "[sbatch] FAILED to requeue job $SLURM_JOB_ID (scontrol's reason above); the" \\
             "checkpoint is in $RUN_DIR: submit the same command again to resume from it" >&2
        exit 1
    fi
    exit 0
fi
echo "[sbatch] srun exited with status $rc"
exit "$rc"
"""


# The scripts checked in under slurm/. Nodes, ranks, time, CPUs and signal lead must agree with
# the configs' topology/launch sections (tests/unit/test_sbatch_render.py checks that).
SCRIPTS: dict[str, SbatchSpec] = {
    "ppo_70b": SbatchSpec(
        job_name="ppo_70b", nodes=8, gpus_per_node=8, nproc_per_node=8, cpus_per_task=64,
        time="48:00:00", config="configs/ppo_70b.yaml", signal_lead_s=1200,
        description="PPO on a 70B actor (critic, reference and reward model), 8 nodes x 8 GPUs.",
    ),
    "grpo_7b": SbatchSpec(
        job_name="grpo_7b", nodes=2, gpus_per_node=8, nproc_per_node=8, cpus_per_task=64,
        time="24:00:00", config="configs/grpo_7b.yaml",
        description="GRPO on a 7B model with vLLM rollouts, 2 nodes x 8 GPUs.",
    ),
    "sft_7b": SbatchSpec(
        job_name="sft_7b", nodes=1, gpus_per_node=8, nproc_per_node=8, cpus_per_task=64,
        time="12:00:00", config="configs/sft_7b.yaml",
        description="Supervised fine-tuning of a 7B model, 1 node x 8 GPUs.",
    ),
    "dpo_7b": SbatchSpec(
        job_name="dpo_7b", nodes=1, gpus_per_node=8, nproc_per_node=8, cpus_per_task=64,
        time="12:00:00", config="configs/dpo_7b.yaml",
        description="DPO on a 7B model (policy + frozen reference), 1 node x 8 GPUs.",
    ),
    "tiny_test": SbatchSpec(
        job_name="tiny_test", nodes=2, gpus_per_node=0, nproc_per_node=2, cpus_per_task=1,
        time="00:15:00", module="hpc_rlhf.launch.smoke",
        description="CPU smoke test: 2 nodes x 2 ranks, gloo all_reduce and the "
        "SIGUSR1 checkpoint/requeue contract (scripts/slurm_cluster.sh gives a local cluster).",
    ),
}


def slurm_dir() -> Path:
    return Path(__file__).resolve().parents[2] / "slurm"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Render the slurm/*.sbatch job scripts.")
    p.add_argument("names", nargs="*", help=f"print these scripts: {', '.join(SCRIPTS)}")
    p.add_argument("--write", action="store_true", help="rewrite slurm/*.sbatch")
    p.add_argument("--check", action="store_true", help="exit 1 if slurm/*.sbatch are stale")
    args = p.parse_args(argv)
    unknown = [n for n in args.names if n not in SCRIPTS]
    if unknown:
        p.error(f"unknown script(s) {unknown}; choose from {sorted(SCRIPTS)}")
    stale = []
    for name, spec in SCRIPTS.items():
        path, text = slurm_dir() / f"{name}.sbatch", render_sbatch(spec)
        if args.write:
            path.parent.mkdir(exist_ok=True)
            path.write_text(text)
            path.chmod(0o755)
        elif args.check and (not path.exists() or path.read_text() != text):
            stale.append(str(path))
    for name in args.names:
        sys.stdout.write(render_sbatch(SCRIPTS[name]))
    if stale:
        print("stale (run python -m hpc_rlhf.launch.sbatch --write):", *stale, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
