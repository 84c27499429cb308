"""`python -m hpc_rlhf.submit`: validate, plan, then submit with submitit (or run locally).

    python -m hpc_rlhf.submit --config configs/ppo_70b.yaml --dry-run        # plan only
    python -m hpc_rlhf.submit --config configs/grpo_7b.yaml actor.lr=1e-6    # queue it
    python -m hpc_rlhf.submit --config configs/tiny_disagg.yaml --program smoke --wait
    python -m hpc_rlhf.submit --config X.yaml topology.nodes=1 --local       # no SLURM
    python -m hpc_rlhf.submit --config configs/ppo_70b.yaml --sbatch         # plain sbatch

Exit codes: 0 ok, 2 invalid config/layout (nothing queued), 1 the job failed (--wait/--local).

SLURM shape: submitit's SlurmExecutor with nodes=N, tasks_per_node=1 (never G tasks per node
plus torchrun: that double-spawns), gpus_per_node=G. Each node's task (TorchrunTask) execs
one torchrun agent with c10d rendezvous on the first node's SLURM address; torchrun starts G
ranks of `hpc_rlhf.launch.main`. srun runs with --kill-on-bad-exit so a failed node ends the job.

Preemption: submitit asks SLURM for --signal=USR2@launch.signal_lead_s (its default signal;
USR2 reaches every task). We do NOT use submitit's Checkpointable: its handler acts only on
global task 0 and runs the checkpoint inside the signal handler, so it cannot make the ranks
on other nodes save, and waiting for the torchrun child there can deadlock on Popen's waitpid
lock. Instead TorchrunTask replaces the USR2 handler on every node with "forward SIGUSR1 to
torchrun" (torchrun forwards it to the ranks), i.e. the same contract as the sbatch scripts
(hpc_rlhf/launch/sbatch.py): the program checkpoints, rank 0 writes $HPC_RLHF_RUN_DIR/REQUEUE,
torchrun exits; then task 0 runs `scontrol requeue` and exits without a result, exactly what
submitit itself does when it requeues, so the requeued job reruns the same pickled task and the
program resumes from the run directory. Test it: `scancel --signal=USR2 <jobid>`.
SLURM delivers a step signal to every process of the step, so torchrun (told to handle USR2)
and the ranks (signals.py) get USR2 directly as well: all paths set the same idempotent flag.
"""
from __future__ import annotations

import argparse
import math
import os
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from hpc_rlhf.config import ConfigError, JobConfig, load_config
from hpc_rlhf.config.rules import GENERATING_TRAINERS
from hpc_rlhf.launch import plan as planlib
from hpc_rlhf.launch.preflight import format_findings, preflight
from hpc_rlhf.launch.rundir import (ENV_RUN_DIR, RerunRefused, check_rerun, failure_line,
                                    resolve_run_dir)
from hpc_rlhf.runtime.signals import REQUEUE_FILE
from hpc_rlhf.topology.layout import Layout, build_layout

REPO = Path(__file__).resolve().parents[2]


def _time_minutes(t: str) -> int:
    """SLURM time ([D-]HH:MM:SS, MM:SS or minutes) -> minutes (submitit's unit)."""
    days, _, rest = t.rpartition("-")
    parts = [int(x) for x in rest.split(":")]
    if len(parts) == 1:
        minutes = parts[0]
    elif len(parts) == 2:
        minutes = parts[0] + (parts[1] + 59) // 60
    else:
        minutes = parts[0] * 60 + parts[1] + (parts[2] + 59) // 60
    return minutes + int(days or 0) * 24 * 60


def gpus_per_node(cfg: JobConfig) -> int:
    """GPUs to request per node: one per rank, unless the job is explicitly CPU (gloo)."""
    return 0 if cfg.topology.backend == "gloo" else cfg.topology.procs_per_node


def shutdown_timeout_s(cfg: JobConfig) -> int:
    # torchrun lets ranks finish their checkpoint this long after forwarding a signal.
    return max(30, cfg.launch.signal_lead_s - 60)


def sbatch_spec(cfg: JobConfig, config_path: str | None, overrides: list, program: str | None,
                run_dir: Path, output: str = "%x-%j.out"):
    """The plain-sbatch job of `cfg` (ValueError when overrides cannot be baked into a script)."""
    from hpc_rlhf.launch.sbatch import SbatchSpec

    lc = cfg.launch
    env = tuple(tuple(item.split("=", 1)) for item in lc.env)
    env += (("HPC_RLHF_PROGRAM", program),) if program else ()
    return SbatchSpec(
        job_name=lc.name, nodes=cfg.topology.nodes, gpus_per_node=gpus_per_node(cfg),
        nproc_per_node=cfg.topology.procs_per_node, cpus_per_task=lc.cpus_per_node,
        time=lc.time, config=config_path, overrides=tuple(overrides),
        partition=lc.partition or None, account=lc.account or None, qos=lc.qos or None,
        mem=lc.mem, run_dir=str(run_dir), signal_lead_s=lc.signal_lead_s, output=output,
        extra_env=env, setup=tuple(lc.setup), requeue=lc.requeue,
        max_restarts=lc.max_restarts)


def sbatch_text(cfg: JobConfig, config_path: str | None, overrides: list, program: str | None,
                run_dir: Path) -> str:
    """The equivalent plain-sbatch script (hpc_rlhf/launch/sbatch.py renders it)."""
    from hpc_rlhf.launch.sbatch import render_sbatch
    try:
        return render_sbatch(sbatch_spec(cfg, config_path, overrides, program, run_dir))
    except ValueError as e:
        return f"# (no sbatch script: {e})"


def _positive_gib(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text!r}: give the usable GiB of one GPU, e.g. 79.6")
    return value


def _reward_server_line(cfg: JobConfig, gpu_mem_gb: float) -> list:
    """A remote reward model runs outside this job: say what serving it takes."""
    if cfg.reward.source != "remote" or cfg.train.trainer not in GENERATING_TRAINERS:
        return []
    from hpc_rlhf.rewards.remote import mask_urls
    rm = planlib.count_params(cfg.model.reward_model_path or cfg.model.path,
                              0 if cfg.model.reward_model_path else cfg.model.num_params_b)
    which = "model.reward_model_path" if cfg.model.reward_model_path else "the actor"
    weights = 2 * rm / planlib.GIB
    gpus = math.ceil(weights / (0.9 * gpu_mem_gb))
    size = (f"; a reward model the size of {which} ({rm / 1e9:.1f} B) holds {weights:.0f} GiB "
            f"of bf16 weights wherever it is served: at least {gpus} GPU(s) of {gpu_mem_gb:g} "
            "GiB (weights to 90%, before activations), not counted here") if rm else ""
    return [f"== reward server(s) {mask_urls(cfg.reward.remote_url)}: outside this job{size}"]


def _rl_batching_line(cfg: JobConfig) -> list:
    """What train.shared_prompt and train.max_tokens_per_micro_batch resolve to (auto or set)."""
    if cfg.train.trainer != "rl":
        return []
    from hpc_rlhf.config.rules import shared_prompt, token_budget
    tr, n = cfg.train, cfg.rollout.n_samples_per_prompt
    row = cfg.data.max_prompt_len + n * cfg.rollout.max_new_tokens
    shared = (f"shared prompts {'on' if shared_prompt(cfg) else 'off'} "
              f"(train.shared_prompt={tr.shared_prompt}; a group's packed row: up to {row} tokens)")
    tokens, responses = token_budget(cfg)
    if not tokens:
        budget = (f"fixed micro-batches of {tr.micro_batch_size} samples "
                  f"(train.max_tokens_per_micro_batch={tr.max_tokens_per_micro_batch})")
    else:
        budget = (f"micro-batches by a budget of {tokens} tokens"
                  + (f" and {responses} response positions" if responses else "")
                  + f" (train.max_tokens_per_micro_batch={tr.max_tokens_per_micro_batch}"
                  + (": auto" if tr.max_tokens_per_micro_batch < 0 else "") + ")")
    return [f"== RL training forwards: {shared}; {budget}"]


def plan_text(cfg: JobConfig, layout: Layout, config_path: str | None, overrides: list,
              program: str | None, gpu_mem_gb: float) -> tuple:
    """(full dry-run text, warnings)."""
    run_dir = resolve_run_dir(cfg)
    mem = planlib.memory_plan(cfg, layout, gpu_mem_gb)
    sleeps = layout.mode == "colocated" and cfg.rollout.enable_sleep
    mem_text, warnings = planlib.format_memory(mem, gpu_mem_gb, sleeps)
    ckpt_text, ckpt_warnings = planlib.checkpoint_plan(cfg)
    p = planlib.count_params(cfg.model.path, cfg.model.num_params_b)
    if p == 0:
        warnings.append(f"WARNING: parameter count of model.path={cfg.model.path!r} unknown; "
                        "set model.num_params_b for a memory estimate")
    warnings += ckpt_warnings
    task = torchrun_task(cfg, argparse.Namespace(config=config_path, overrides=overrides,
                                                 program=program), run_dir)
    parts = [
        f"== job {cfg.launch.name}: {cfg.train.trainer} ({cfg.algorithm.name}), model "
        f"{cfg.model.path} ({p / 1e9:.2f} B params), program {program or cfg.train.trainer}",
        f"== run directory: {run_dir}",
        "== layout (node, GPU, rank)", layout.describe(), *_rl_batching_line(cfg),
        f"== memory per GPU (estimate; GPU {gpu_mem_gb:g} GiB usable; see "
        "hpc_rlhf/launch/plan.py)", mem_text, *planlib.guessed_shape_line(cfg),
        *planlib.format_host_memory(planlib.host_memory_plan(cfg, layout)),
        *_reward_server_line(cfg, gpu_mem_gb),
        f"== checkpoint: {ckpt_text}", *warnings,
        "== torchrun command (one per node, as submitit's task runs it)",
        torchrun_line(task, cfg.topology.nodes),
        "== equivalent sbatch script", sbatch_text(cfg, config_path, overrides, program, run_dir),
    ]
    return "\n".join(parts), warnings


# What the printed torchrun command says where each node's task puts its own values.
NODE_VALUES = {"@ENDPOINT@": "$HEAD_ADDR:$RDZV_PORT", "@JOBID@": "$SLURM_JOB_ID",
               "@IS_HOST@": '"is_host=$([[ $SLURM_NODEID == 0 ]] && echo true || echo false)"'}


def torchrun_line(task: "TorchrunTask", nnodes: int) -> str:
    """`task`'s torchrun command as one shell line: its argv, with the rendezvous endpoint, job
    id and is-host flag as the shell expressions a node's step expands to what the task uses."""
    argv = task.argv(nnodes, "@ENDPOINT@", "@JOBID@", is_host=True)
    argv[argv.index("is_host=true")] = "@IS_HOST@"
    line = planlib.shell_join(argv)
    for placeholder, value in NODE_VALUES.items():
        line = line.replace(placeholder, value)
    env = {**planlib.torchrun_env(task.max_restarts),
           **({"HPC_RLHF_PROGRAM": task.program} if task.program else {})}
    return "".join(f"{k}={shlex.quote(v)} " for k, v in env.items()) + line


def _head_address() -> str:
    """The first node of the allocation, by the address SLURM itself uses for it."""
    head = subprocess.run(["scontrol", "show", "hostnames", os.environ["SLURM_JOB_NODELIST"]],
                          capture_output=True, text=True, check=True).stdout.split()[0]
    node_info = subprocess.run(["scontrol", "show", "node", head], capture_output=True,
                               text=True).stdout
    return next((w.split("=", 1)[1] for w in node_info.split() if w.startswith("NodeAddr=")),
                head)


@dataclass
class TorchrunTask:
    """What submitit runs on every node: one torchrun agent (see the module doc)."""
    config_path: str | None
    overrides: list
    nproc_per_node: int
    run_dir: str
    program: str | None
    shutdown_timeout_s: int
    python: str = sys.executable
    max_restarts: int = 0

    def argv(self, num_nodes: int, endpoint: str, job_id: str, is_host: bool) -> list:
        """The torchrun command of one node (the dry run prints it: torchrun_line)."""
        return planlib.torchrun_argv(self.config_path, self.overrides, num_nodes,
                                     self.nproc_per_node, endpoint, job_id,
                                     self.shutdown_timeout_s, self.python, is_host=is_host,
                                     max_restarts=self.max_restarts)

    def __call__(self) -> int:
        import submitit

        env = submitit.JobEnvironment()
        job_id = os.environ.get("SLURM_JOB_ID", env.job_id)
        addr = _head_address()
        # As in the sbatch scripts: $RDZV_PORT if the job's environment sets it, else derived
        # from the job id so that jobs sharing a node differ.
        port = int(os.environ.get("RDZV_PORT") or 20000 + int(job_id) % 20000)
        argv = self.argv(env.num_nodes, f"{addr}:{port}", str(job_id), is_host=env.node == 0)
        run_dir = Path(self.run_dir)
        marker = run_dir / REQUEUE_FILE
        if env.global_rank == 0:
            run_dir.mkdir(parents=True, exist_ok=True)
            marker.unlink(missing_ok=True)  # left by a killed run: must not requeue this one
        child_env = {**os.environ, **planlib.torchrun_env(self.max_restarts),
                     ENV_RUN_DIR: str(run_dir),
                     "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
        if self.program:
            child_env["HPC_RLHF_PROGRAM"] = self.program
        print(f"[submit] node {env.node}/{env.num_nodes} restart "
              f"{os.environ.get('SLURM_RESTART_COUNT', '0')}: {planlib.shell_join(argv)}",
              flush=True)
        proc = subprocess.Popen(argv, env=child_env)

        signalled = []

        def forward(signum, frame):
            signalled.append(signum)
            print(f"[submit] node {env.node}: {signal.Signals(signum).name} -> SIGUSR1 to "
                  "torchrun (checkpoint requested)", flush=True)
            if proc.poll() is None:
                proc.send_signal(signal.SIGUSR1)

        signal.signal(signal.SIGUSR2, forward)   # submitit's preemption signal
        signal.signal(signal.SIGUSR1, forward)   # also accept the sbatch scripts' signal
        while proc.poll() is None:  # poll, not wait(): handlers must never block on waitpid
            time.sleep(0.2)
        rc = proc.returncode
        if env.global_rank == 0 and marker.exists():
            marker.unlink()
            print(f"[submit] checkpoint written; requeueing job {job_id}", flush=True)
            out = subprocess.run(["scontrol", "requeue", str(job_id)], capture_output=True,
                                 text=True, timeout=60)
            if out.returncode != 0:
                raise RuntimeError(
                    f"FAILED to requeue job {job_id} (scontrol: {out.stderr.strip()}); the "
                    f"checkpoint is in {run_dir}: submit the same command again to resume")
            sys.exit(-1)  # like submitit's own requeue: no result pickle, the rerun writes it
        if rc != 0 and signalled and env.global_rank != 0:
            # torchrun exits 1 after forwarding a signal; exiting non-zero here would make
            # srun --kill-on-bad-exit kill task 0 before it can requeue.
            print(f"[submit] node {env.node}: torchrun exited {rc} after the signal", flush=True)
            return rc
        if rc != 0:
            raise RuntimeError(f"torchrun on node {env.node} exited with status {rc}; "
                               "its failure summary above names the rank")
        return rc


EXAMPLES = """examples:
  # check a config and see the rank layout, memory plan and sbatch script; nothing is queued
  python -m hpc_rlhf.submit --config configs/ppo_70b.yaml --dry-run
  # submit to SLURM with overrides; --wait blocks and prints the log tail at the end
  python -m hpc_rlhf.submit --config configs/grpo_7b.yaml train.actor_lr=1e-6 --wait
  # the same with plain sbatch (no submitit): the script goes to <run dir>/job.sbatch
  python -m hpc_rlhf.submit --config configs/grpo_7b.yaml train.actor_lr=1e-6 --sbatch
  # run on this machine (one node); Ctrl-C checkpoints, rerunning the command resumes
  python -m hpc_rlhf.submit --config configs/grpo_tiny.yaml --local
  # a new run that starts from another run's newest checkpoint
  python -m hpc_rlhf.submit --config configs/grpo_tiny.yaml --local launch.name=more \\
      checkpoint.resume_from=runs/grpo_tiny
  # what a run is doing, the end of its log, stopping it (it saves at the end of the step)
  python -m hpc_rlhf.submit status runs/grpo_tiny      # or a SLURM job id
  python -m hpc_rlhf.submit logs runs/grpo_tiny -n 100 [--rank 1]
  python -m hpc_rlhf.submit cancel 12345 [--now]
  # any checkpoint as an HF model directory (default: <run dir>/export_step_<N>)
  python -m hpc_rlhf.submit export runs/grpo_tiny/checkpoints/step_10 --out my_model
  # held-out reward of a model, no training: <run dir>/eval.json
  python -m hpc_rlhf.submit --config configs/grpo_tiny.yaml --local --program eval \\
      model.path=runs/grpo_tiny/export launch.name=grpo_tiny_eval
  # training curves as a PNG (no tensorboard needed): runs/grpo_tiny/curves.png
  python -m hpc_rlhf.submit plot runs/grpo_tiny [--metrics reward/mean,kl]
fields: python -m hpc_rlhf.config docs [SECTION]; exit codes: 0 ok (or already finished),
2 invalid config or run directory (nothing queued), 1 the job failed (--wait / --local),
128+N stopped by signal N (--local)."""


def _parse(argv: list | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m hpc_rlhf.submit", description=__doc__.split(
        "\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EXAMPLES)
    p.add_argument("--config", default=None, help="YAML config (see configs/)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.actor_lr=1e-6")
    p.add_argument("--dry-run", action="store_true", help="print the plan and exit")
    p.add_argument("--local", action="store_true",
                   help="run torchrun on this machine (topology.nodes must be 1)")
    p.add_argument("--program", default=None,
                   help="rank program instead of train.trainer (e.g. smoke; see launch/main.py)")
    p.add_argument("--sbatch", action="store_true",
                   help="submit with plain sbatch instead of submitit: the job script is rendered "
                   "from the config and overrides (header included) into <run dir>/job.sbatch")
    p.add_argument("--wait", action="store_true", help="block until the job ends, print its log")
    p.add_argument("--gpu-mem-gb", type=_positive_gib, default=79.6,
                   help="usable memory of one GPU in GiB, as nvidia-smi reports it, for the plan "
                   "(H100 80GB: 79.6, the default; A100 80GB: 80; H200: 140.4; A100 40GB: 40)")
    p.add_argument("--folder", default=None,
                   help="submitit folder (default: <run dir>/submitit)")
    return p.parse_args(argv)


def _srun_cpus(cpus_per_node: int) -> tuple[list, list]:
    """(srun arguments, setup lines) giving the node's task its CPUs, as the sbatch scripts do:
    srun does not inherit --cpus-per-task from sbatch since SLURM 22.05 (the task would be bound
    to one CPU). With none requested, every CPU the job holds on the node: submitit quotes srun
    arguments, so that count reaches srun as SRUN_CPUS_PER_TASK (srun's -c, SLURM >= 22.05)."""
    if cpus_per_node:
        return [f"--cpus-per-task={cpus_per_node}"], []
    return [], ["export SRUN_CPUS_PER_TASK=${SLURM_CPUS_PER_TASK:-$SLURM_CPUS_ON_NODE}"]


def submitit_params(cfg: JobConfig, run_dir: Path) -> dict:
    """submitit's SlurmExecutor parameters for `cfg` (every launch field lands in them)."""
    lc, gpus = cfg.launch, gpus_per_node(cfg)
    # launch.requeue=false: the ranks still checkpoint on a signal but write no REQUEUE marker.
    # singleton: one job of this name at a time (a second one waits: same run directory).
    extra = {"requeue": True} if lc.requeue else {"no_requeue": True}
    srun_args, srun_cpus = _srun_cpus(lc.cpus_per_node)
    params = dict(job_name=lc.name, nodes=cfg.topology.nodes, ntasks_per_node=1,
                  time=_time_minutes(lc.time), signal_delay_s=lc.signal_lead_s,
                  srun_args=["--kill-on-bad-exit=1", *srun_args], additional_parameters=extra,
                  dependency="singleton",
                  setup=[f"export PYTHONPATH={REPO}:${{PYTHONPATH:-}}",
                         f"export {ENV_RUN_DIR}={run_dir}", *lc.setup,
                         *(f"export {k}={shlex.quote(v)}" for k, v in
                           (item.split("=", 1) for item in lc.env)), *srun_cpus])
    if gpus:
        params.update(gpus_per_node=gpus, exclusive=True)
    if lc.cpus_per_node:
        params["cpus_per_task"] = lc.cpus_per_node
    for key in ("partition", "account", "qos"):
        if getattr(lc, key):
            params[key] = getattr(lc, key)
    if lc.mem != "0" or gpus:
        params["mem"] = lc.mem
    return params


def submit_slurm(cfg: JobConfig, args, run_dir: Path):
    import submitit

    folder = Path(args.folder or run_dir / "submitit")
    ex = submitit.SlurmExecutor(folder=folder, python=sys.executable)
    ex.update_parameters(**submitit_params(cfg, run_dir))
    return ex.submit(torchrun_task(cfg, args, run_dir))


def torchrun_task(cfg: JobConfig, args, run_dir: Path) -> TorchrunTask:
    config = str(Path(args.config).resolve()) if args.config else None
    return TorchrunTask(config, list(args.overrides), cfg.topology.procs_per_node,
                        str(run_dir), args.program, shutdown_timeout_s(cfg),
                        max_restarts=cfg.launch.max_restarts)


def submit_sbatch(cfg: JobConfig, args, run_dir: Path) -> int:
    """`--sbatch`: render the job script (checked config, header from it) and `sbatch` it."""
    from hpc_rlhf.launch.sbatch import render_sbatch
    logs = run_dir / "logs"
    config = str(Path(args.config).resolve()) if args.config else None
    try:
        spec = sbatch_spec(cfg, config, list(args.overrides), args.program, run_dir,
                           output=str(logs / "%x-%j.out"))
    except ValueError as e:
        print(f"--sbatch: {e}", file=sys.stderr)
        return 2
    logs.mkdir(parents=True, exist_ok=True)
    script = run_dir / "job.sbatch"
    script.write_text(render_sbatch(spec))
    env = {**os.environ, "PYTHON": os.environ.get("PYTHON", sys.executable),
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run(["sbatch", "--parsable", str(script)], capture_output=True, text=True,
                         env=env, timeout=120)
    if out.returncode != 0:
        print(f"[submit] sbatch refused the job: {out.stderr.strip() or out.stdout.strip()}",
              file=sys.stderr)
        return 1
    job_id = out.stdout.strip().split(";")[0]
    log = logs / f"{cfg.launch.name}-{job_id}.out"
    print(f"[submit] submitted job {job_id} with sbatch: {cfg.topology.nodes} nodes x "
          f"{cfg.topology.procs_per_node} ranks; script {script}; log {log}; run dir {run_dir}",
          flush=True)
    return _waiting(job_id, lambda: wait_sbatch_job(job_id, log, run_dir)) if args.wait else 0


def _waiting(job_id, wait) -> int:
    """`--wait`: Ctrl-C (SIGINT) stops the waiting, not the job (it says how to follow or stop
    it). SIGINT is handled even when the submitter started with it ignored (nohup, a background
    job of a script), as the local launcher handles it."""
    old = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        return wait()
    except KeyboardInterrupt:
        print(f"\n[submit] stopped waiting; job {job_id} keeps running: python -m "
              f"hpc_rlhf.submit status {job_id} (or logs / cancel {job_id})", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGINT, old)


def wait_sbatch_job(job_id: str, log: Path, run_dir: Path, poll_s: float = 0.5) -> int:
    """Until the job leaves the queue; 0 iff it COMPLETED (else its state and failure line)."""
    while subprocess.run(["squeue", "-h", "-j", job_id], capture_output=True,
                         text=True).stdout.strip():
        time.sleep(poll_s)
    from hpc_rlhf.launch.jobs import slurm_job
    state = (slurm_job(job_id) or {}).get("JobState", "?")
    tail = "\n".join(log.read_text(errors="replace").splitlines()[-40:]) if log.exists() else ""
    print(f"[submit] job {job_id} ended {state}; log tail ({log}):\n{tail}", flush=True)
    if state == "COMPLETED":
        return 0
    line = failure_line(run_dir) or f"{state}: the reason is in the log tail above"
    print(f"[submit] job {job_id} {line}", file=sys.stderr, flush=True)
    return 1


def failure_summaries(log: str) -> list[str]:
    """torchrun's failure summary blocks in a node's log ("==== / <entrypoint> FAILED / ...
    Root Cause ... / ===="): a log tail may cut them off behind later tracebacks."""
    lines, out, k = log.splitlines(), [], 0
    while k < len(lines) - 1:
        if set(lines[k].strip()) == {"="} and lines[k + 1].rstrip().endswith(" FAILED"):
            end = next((j for j in range(k + 2, len(lines)) if set(lines[j].strip()) == {"="}),
                       len(lines) - 1)
            out.append("\n".join(lines[k:end + 1]))
            k = end + 1
        else:
            k += 1
    return out


def wait_job(job, run_dir: Path | None = None, poll_s: float = 0.5) -> int:
    """Until the job leaves the queue (a requeue keeps it there); 0 iff it succeeded. On a
    failure the last line names the rank that failed first, its reason and its log."""
    env = {**os.environ}
    while True:
        out = subprocess.run(["squeue", "-h", "-j", str(job.job_id), "-o", "%T"],
                             capture_output=True, text=True, env=env)
        if out.returncode == 0 and not out.stdout.strip():
            break
        time.sleep(poll_s)
    for _ in range(20):  # the result pickle lands on the shared folder right after
        if job.paths.result_pickle.exists():
            break
        time.sleep(0.25)
    tail = "\n".join(((job.stdout() or "") + (job.stderr() or "")).splitlines()[-60:])
    print(f"[submit] job {job.job_id} ended; log tail ({job.paths.stdout}):\n{tail}", flush=True)
    # Read each node task's result file directly: submitit's own job.results() waits for
    # missing ones through sacct (absent on many clusters) with growing back-off, so a task
    # killed by srun --kill-on-bad-exit (no result file) would keep us waiting for minutes.
    from submitit.core.utils import pickle_load
    failed = []
    for task in range(job.num_tasks):
        path = job.task(task).paths.result_pickle
        if not path.exists():
            failed.append(f"task {task}: ended without a result (killed after another failed)")
            continue
        outcome, value = pickle_load(path)
        if outcome != "success":
            failed.append(f"task {task}: {str(value).strip().splitlines()[-1]}")
    if failed:
        for task in range(job.num_tasks):  # torchrun's summaries name the failed rank
            t = job.task(task)
            for summary in failure_summaries((t.stdout() or "") + "\n" + (t.stderr() or "")):
                print(f"[submit] node task {task}: torchrun's failure summary:\n{summary}",
                      flush=True)
        print(f"[submit] job {job.job_id} FAILED: " + "; ".join(failed), file=sys.stderr)
        line = failure_line(run_dir) if run_dir is not None else None
        if line:
            print(f"[submit] job {job.job_id} {line}", file=sys.stderr, flush=True)
        return 1
    return 0


def _subcommand(argv: list) -> int | None:
    """status / logs / cancel / export / plot: the programs about an existing run."""
    if argv[:1] and argv[0] in ("status", "logs", "cancel"):
        from hpc_rlhf.launch.jobs import main as jobs_main
        return jobs_main(argv)
    if argv[:1] == ["export"]:
        from hpc_rlhf.launch.export import main as export_main
        return export_main(argv[1:])
    if argv[:1] == ["plot"]:
        from hpc_rlhf.metrics.plot import main as plot_main
        return plot_main(argv[1:])
    return None


def _checked(args) -> tuple:
    """(cfg, layout, run dir, finished message) or an exit code: the config, the program and
    the run directory's verdict (same config resumes, finished says so, changed is refused)."""
    try:
        cfg = load_config(args.config, args.overrides)
        layout = build_layout(cfg)
    except (ConfigError, ValueError) as e:
        print(e, file=sys.stderr)
        return 2
    if args.program:
        from hpc_rlhf.launch.main import PROGRAMS
        if args.program not in PROGRAMS:
            print(f"--program {args.program!r} is unknown; choose one of {sorted(PROGRAMS)}",
                  file=sys.stderr)
            return 2
    run_dir = resolve_run_dir(cfg).resolve()
    try:
        finished = check_rerun(cfg, run_dir)
    except RerunRefused as e:
        print(e, file=sys.stderr)
        return 2
    return cfg, layout, run_dir, finished


def _preflight(cfg: JobConfig, args):
    """(findings, report text) of what the job reads, plus --local's one-node rule."""
    found = preflight(cfg)
    if args.local and cfg.topology.nodes != 1:
        found.problems.insert(0, f"--local runs one node, but topology.nodes="
                              f"{cfg.topology.nodes}; add topology.nodes=1 (and adjust ranks) "
                              "or submit to SLURM")
    return found, format_findings(found, f"{args.config or 'the defaults'}"
                                  f"{' + overrides' if args.overrides else ''}",
                                  " (nothing queued)")


def _start(cfg: JobConfig, layout: Layout, args, run_dir: Path, text: str) -> int:
    """Run it here (--local) or queue it (submitit, or plain sbatch with --sbatch)."""
    head = text.split("== torchrun command")[0].rstrip()
    os.environ[ENV_RUN_DIR] = str(run_dir)
    if args.local:  # the GPU memory plan means little here: it goes to the run directory
        (run_dir / "logs").mkdir(parents=True, exist_ok=True)
        (run_dir / "logs" / "plan.txt").write_text(text + "\n")
        print(f"{head.splitlines()[0]}\n== {layout.describe().splitlines()[0].strip()}; run "
              f"directory {run_dir} (plan: logs/plan.txt, full output: logs/console.log)",
              flush=True)
        from hpc_rlhf.launch.local import run_local
        return run_local(cfg, args, run_dir, shutdown_timeout_s(cfg))
    print(head, flush=True)
    import shutil
    if shutil.which("sbatch") is None:
        print("[submit] SLURM not found (no sbatch on PATH): run on this machine with --local, "
              "or submit from a cluster login node", file=sys.stderr)
        return 2
    if args.sbatch:
        return submit_sbatch(cfg, args, run_dir)
    job = submit_slurm(cfg, args, run_dir)
    print(f"[submit] submitted job {job.job_id}: {cfg.topology.nodes} nodes x "
          f"{cfg.topology.procs_per_node} ranks; log {job.paths.stdout}; run dir {run_dir}",
          flush=True)
    return _waiting(job.job_id, lambda: wait_job(job, run_dir)) if args.wait else 0


def main(argv: list | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    rc = _subcommand(argv)
    if rc is not None:
        return rc
    args = _parse(argv)
    checked = _checked(args)
    if isinstance(checked, int):
        return checked
    cfg, layout, run_dir, finished = checked
    if finished and not args.dry_run:
        print(finished, flush=True)
        return 0
    text, _ = plan_text(cfg, layout, args.config, args.overrides, args.program,
                        args.gpu_mem_gb)
    found, report = _preflight(cfg, args)
    if args.dry_run:
        print(text + (f"\n== note\n{finished}" if finished else ""))
        if report:
            print(f"== preflight\n{report}")
        return 2 if found.problems else 0
    if report:
        print(report, file=sys.stderr, flush=True)
    if found.problems:
        return 2
    return _start(cfg, layout, args, run_dir, text)


if __name__ == "__main__":
    sys.exit(main())
