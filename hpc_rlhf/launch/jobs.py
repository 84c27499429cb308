"""`python -m hpc_rlhf.submit status|logs|cancel RUN_DIR_OR_JOB`: what a run is doing, the end
of its log, and stopping it cleanly (every rank saves at the end of its current step).

A run is named by its run directory (runs/<launch.name>) or by its SLURM job id. The run
directory says which SLURM job last ran in it (the SLURM_JOB file rank 0 writes) and which
local launcher runs it now (logs/launcher.pid, written by `submit --local`); a job id leads to
its run directory through the job's script (`--sbatch`: <run dir>/job.sbatch) or its output
file (submitit: <run dir>/submitit/...).
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from hpc_rlhf.launch.rundir import OWNER_FILE, failure_line

LAUNCHER_PID = "launcher.pid"  # in <run dir>/logs: "<pid> <host>" while `submit --local` runs
ACTIVE = ("PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "REQUEUED", "REQUEUE_HOLD",
          "RESIZING", "SUSPENDED", "STOPPED")
SHOWN_METRICS = ("reward/mean", "eval/reward", "loss", "loss/policy", "loss/sft", "loss/dpo",
                 "accuracy", "kl", "time/step")


def slurm_job(job_id: str) -> dict | None:
    """`scontrol show job` as a dict, or None when SLURM does not know the job (any more)."""
    try:
        out = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True,
                             text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0 or "JobId=" not in out.stdout:
        return None
    return dict(w.split("=", 1) for w in out.stdout.split() if "=" in w)


def _run_dir_of_job(info: dict) -> Path | None:
    command, stdout = Path(info.get("Command", "")), Path(info.get("StdOut", ""))
    if command.name == "job.sbatch" and (command.parent / "config.yaml").exists():
        return command.parent
    for parent in stdout.parents:
        if parent.name == "submitit":
            return parent.parent
    return None


def resolve(target: str) -> tuple:
    """(run dir or None, SLURM job id or '', its scontrol info or None)."""
    p = Path(target)
    if p.is_dir():
        owner = p / OWNER_FILE
        job = owner.read_text().strip() if owner.is_file() else ""
        return p, job, slurm_job(job) if job else None
    if target.isdigit():
        info = slurm_job(target)
        if info is None:
            raise ValueError(f"SLURM does not know job {target} (it ended more than MinJobAge "
                             "ago, or this is another cluster); name the run directory instead")
        return _run_dir_of_job(info), target, info
    raise ValueError(f"{target!r} is neither a run directory nor a SLURM job id; runs live in "
                     "runs/<launch.name> (launch.run_dir)")


def local_launcher(run_dir: Path) -> int | None:
    """The pid of the `submit --local` launcher running this run on this host, or None."""
    f = run_dir / "logs" / LAUNCHER_PID
    try:
        pid, host = f.read_text().split()
        if host != os.uname().nodename:
            return None
        os.kill(int(pid), 0)
        return int(pid)
    except (OSError, ValueError):
        return None


def _last_metrics(run_dir: Path) -> dict:
    f = run_dir / "metrics.jsonl"
    lines = f.read_text().splitlines() if f.is_file() else []
    return json.loads(lines[-1]) if lines else {}


def _config(run_dir: Path) -> dict:
    import yaml
    f = run_dir / "config.yaml"
    try:
        return yaml.safe_load(f.read_text()) or {} if f.is_file() else {}
    except yaml.YAMLError:
        return {}


def run_state(run_dir: Path, job: str, info: dict | None) -> str:
    """One line: running (where), finished, failed (why) or stopped (how to resume)."""
    from hpc_rlhf.checkpoint.layout import list_checkpoints
    steps = _config(run_dir).get("train", {}).get("num_steps")
    ckpts = list_checkpoints(run_dir / "checkpoints")
    last = f"checkpoint at step {ckpts[-1][0]}" if ckpts else "no checkpoint yet"
    if info and info.get("JobState") in ACTIVE:
        return (f"SLURM job {job} {info['JobState']}"
                + (f" on {info['NodeList']}" if info.get("NodeList") not in (None, "(null)")
                   else f" ({info.get('Reason', '')})") + f"; {last}")
    pid = local_launcher(run_dir)
    if pid:
        return f"running on this machine (launcher pid {pid}); {last}"
    if ckpts and steps and ckpts[-1][0] >= steps:
        export = run_dir / "export"
        return f"finished: {last} of {steps}" + (f"; model in {export}" if export.is_dir() else "")
    failed = failure_line(run_dir)
    if failed:
        return f"{failed}; rerun the same command to resume from the {last}"
    ended = f"SLURM job {job} ended {info['JobState']}, " if info and info.get(
        "JobState") not in (None, "COMPLETED") else ""
    return (f"{ended}stopped: {last}" + (f" of {steps}" if steps else "")
            + "; rerun the same command to resume")


def status(target: str) -> int:
    run_dir, job, info = resolve(target)
    if run_dir is None:
        print(f"SLURM job {job}: {info.get('JobState')} ({info.get('JobName')}); log "
              f"{info.get('StdOut')}; its run directory is unknown (not started by hpc_rlhf?)")
        return 0
    cfg = _config(run_dir)
    tr, alg = cfg.get("train", {}), cfg.get("algorithm", {})
    print(f"run {run_dir}: {tr.get('trainer', '?')}"
          + (f" ({alg.get('name')})" if tr.get("trainer") == "rl" else "")
          + f", model {cfg.get('model', {}).get('path', '?')}, {tr.get('num_steps', '?')} steps")
    print(f"state: {run_state(run_dir, job, info)}")
    m = _last_metrics(run_dir)
    if m:
        shown = [f"{k}={m[k]:.4g}" for k in SHOWN_METRICS if isinstance(m.get(k), (int, float))]
        print(f"last metrics (step {m.get('step', '?')}): {', '.join(shown) or '(none)'}")
    log = _log_file(run_dir, info, None)
    print(f"log: {log}" if log else "log: none yet")
    return 0


def _log_file(run_dir: Path | None, info: dict | None, rank: int | None) -> Path | None:
    if run_dir is not None and rank is not None:
        return run_dir / "logs" / f"rank{rank}.log"
    if info and info.get("StdOut") and Path(info["StdOut"]).is_file():
        return Path(info["StdOut"])
    for name in ("console.log", "rank0.log"):
        if run_dir is not None and (run_dir / "logs" / name).is_file():
            return run_dir / "logs" / name
    return None


def logs(target: str, lines: int, rank: int | None) -> int:
    run_dir, _, info = resolve(target)
    log = _log_file(run_dir, info, rank)
    if log is None or not log.is_file():
        print(f"no log yet for {target}" + (f" ({log})" if log else ""), file=sys.stderr)
        return 1
    print(f"==> {log} <==")
    print("\n".join(log.read_text(errors="replace").splitlines()[-lines:]))
    return 0


def cancel(target: str, now: bool) -> int:
    """Stop the run: its ranks save at the end of the current step (`now`: at once)."""
    run_dir, job, info = resolve(target)
    if info and info.get("JobState") in ACTIVE:
        argv = ["scancel", job] if now else ["scancel", "--signal=TERM", job]
        out = subprocess.run(argv, capture_output=True, text=True, timeout=60)
        if out.returncode != 0:
            print(f"{' '.join(argv)} failed: {out.stderr.strip()}", file=sys.stderr)
            return 1
        print(f"[cancel] SLURM job {job}: " + ("cancelled now; the last complete checkpoint is "
              "kept" if now else "SIGTERM sent: the ranks save at the end of the current step "
              "and the job ends (`cancel --now` to stop at once)"))
        return 0
    pid = local_launcher(run_dir) if run_dir is not None else None
    if pid:
        os.kill(pid, signal.SIGTERM)
        if now:
            os.kill(pid, signal.SIGTERM)  # a second stop request: the launcher kills the ranks
        print(f"[cancel] launcher pid {pid}: " + ("stopping now" if now else "the ranks save at "
              "the end of the current step and exit"))
        return 0
    print(f"[cancel] nothing is running for {target}", file=sys.stderr)
    return 1


def main(argv: list) -> int:
    p = argparse.ArgumentParser(prog="python -m hpc_rlhf.submit",
                                description="Status, log or stop of a run.")
    p.add_argument("command", choices=("status", "logs", "cancel"))
    p.add_argument("target", help="run directory (runs/<launch.name>) or SLURM job id")
    p.add_argument("-n", "--lines", type=int, default=40, help="logs: lines to show")
    p.add_argument("--rank", type=int, default=None, help="logs: this rank's log")
    p.add_argument("--now", action="store_true", help="cancel: stop at once, without saving")
    args = p.parse_args(argv)
    try:
        if args.command == "status":
            return status(args.target)
        if args.command == "logs":
            return logs(args.target, args.lines, args.rank)
        return cancel(args.target, args.now)
    except ValueError as e:
        print(f"{args.command}: {e}", file=sys.stderr)
        return 2
