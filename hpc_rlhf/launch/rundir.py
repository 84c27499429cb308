"""The run directory: one per job, the same one again after a requeue.

    <run_dir>/config.yaml      resolved config (all defaults filled in, overrides applied; secrets
                           in reward.remote_url masked, so the file can be shared)
    <run_dir>/layout.txt       Layout.describe() of the job
    <run_dir>/logs/rank<R>.log every rank's stdout+stderr lines (tee'd, the console keeps them)
    <run_dir>/REQUEUE          written after a signal-triggered checkpoint (see signals.py)
    <run_dir>/logs/failed_rank<R>.txt   one line: why rank R failed in the last attempt
    <run_dir>/SLURM_JOB        the SLURM job that owns the directory (.claims/: takeover tokens)
    <run_dir>/...              checkpoints, metrics: owned by the programs

A run directory remembers its config (config.yaml): `check_rerun` runs before anything is
queued (submit) and again on every rank before the world starts (the sbatch path). The same
config resumes; a finished run says so and exits 0; a different config is refused with the
differences, since resuming it would train on settings config.yaml no longer records. Only
the fields in RERUN_FREE (where and how long the job runs, what it logs, how often it saves)
may change between attempts.

Where: $HPC_RLHF_RUN_DIR if set (the sbatch script and our submitit task set it), else
launch.run_dir with {name} replaced by launch.name. Both are fixed for a job, so a requeued
job finds its checkpoints.
"""
from __future__ import annotations

import os
import sys
import threading
import time
from pathlib import Path

from hpc_rlhf.config import JobConfig, to_dict, to_yaml
from hpc_rlhf.runtime.redact import redacted

ENV_RUN_DIR = "HPC_RLHF_RUN_DIR"


def resolve_run_dir(cfg: JobConfig) -> Path:
    env = os.environ.get(ENV_RUN_DIR)
    return Path(env) if env else Path(cfg.launch.run_dir.format(name=cfg.launch.name))


def prepare_run_dir(cfg: JobConfig, layout_text: str, rank: int) -> Path:
    """Create the run directory; global rank 0 writes config.yaml and layout.txt (atomically,
    so a requeued job rewriting them never leaves half a file)."""
    run_dir = resolve_run_dir(cfg)
    (run_dir / "logs").mkdir(parents=True, exist_ok=True)
    if rank == 0:
        for name, text in (("config.yaml", to_yaml(redacted(cfg))),
                           ("layout.txt", layout_text + "\n")):
            tmp = run_dir / f".{name}.tmp"
            tmp.write_text(text)
            os.replace(tmp, run_dir / name)
    return run_dir


class _Tee:
    """Write to the original stream and to a per-rank log file, each line prefixed."""

    def __init__(self, stream, log, prefix: str):
        self._stream, self._log, self._prefix, self._bol = stream, log, prefix, True

    def write(self, text: str) -> int:
        self._stream.write(text)
        out = []
        for ch in text.splitlines(keepends=True):
            out.append((self._prefix if self._bol else "") + ch)
            self._bol = ch.endswith("\n")
        self._log.write("".join(out))
        self._log.flush()
        return len(text)

    def flush(self) -> None:
        self._stream.flush()
        self._log.flush()

    def __getattr__(self, name):
        return getattr(self._stream, name)


def tee_rank_logs(run_dir: Path, rank: int) -> Path:
    """Append this rank's Python-level stdout/stderr to logs/rank<R>.log (a requeued run
    appends to the same file)."""
    path = run_dir / "logs" / f"rank{rank}.log"
    log = open(path, "a", buffering=1)
    sys.stdout = _Tee(sys.stdout, log, "")
    sys.stderr = _Tee(sys.stderr, log, "")
    return path


class RerunRefused(ValueError):
    """The run directory holds a run that this config must not continue (or resume_from is
    not a checkpoint); the message lists why and the ways out."""


# Fields that may differ between attempts of one run (prefixes end with a dot).
RERUN_FREE = ("launch.", "logging.", "checkpoint.save_every", "checkpoint.keep_last",
              "checkpoint.export_hf", "checkpoint.resume_from", "checkpoint.write_gb_s",
              "topology.timeout_s")


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_differences(old: dict, cfg: JobConfig) -> list[str]:
    """`field: old -> new` for every field outside RERUN_FREE that differs. A field the saved
    config lacks (added to the schema since) counts as its default; one the schema no longer
    has is ignored."""
    a, b = _flat(old), _flat(to_dict(redacted(cfg)))
    defaults = _flat(to_dict(JobConfig()))
    out = []
    for key in sorted(b):
        before = a.get(key, defaults.get(key))
        if key.startswith(RERUN_FREE) or before == b[key]:
            continue
        out.append(f"  {key}: {before!r} -> {b[key]!r}")
    return out


def check_rerun(cfg: JobConfig, run_dir: Path | None = None) -> str | None:
    """Before a run starts in `run_dir`: None to go on (a new run, or a resume with the same
    config); a message when the run already finished (print it, exit 0). Raises RerunRefused
    when the directory holds a run with a different config, or checkpoint.resume_from does
    not name a checkpoint."""
    import yaml

    from hpc_rlhf.checkpoint.layout import branch_source, list_checkpoints
    run_dir = Path(run_dir) if run_dir is not None else resolve_run_dir(cfg)
    saved = run_dir / "config.yaml"
    ckpts = list_checkpoints(run_dir / "checkpoints")
    if cfg.checkpoint.resume_from and not ckpts:
        try:
            branch_source(cfg.checkpoint.resume_from)
        except ValueError as e:
            raise RerunRefused(str(e)) from None
    if not saved.is_file() or not cfg.checkpoint.resume:
        return None
    try:
        old = yaml.safe_load(saved.read_text()) or {}
    except yaml.YAMLError:
        return None  # a foreign or damaged file: prepare_run_dir rewrites it
    diffs = config_differences(old, cfg)
    if diffs and ckpts:
        raise RerunRefused(
            f"{run_dir} holds a run with a different config ({saved}), checkpointed at step "
            f"{ckpts[-1][0]}; resuming it would train on settings that config.yaml does not "
            f"record. Differences (saved -> now):\n" + "\n".join(diffs) +
            "\nEither start a new run (launch.name=<new name>), or branch from its checkpoint "
            f"with launch.name=<new name> checkpoint.resume_from={ckpts[-1][1]}")
    if ckpts and ckpts[-1][0] >= cfg.train.num_steps:
        export = run_dir / "export"
        return (f"[run] {run_dir} already finished: checkpoint at step {ckpts[-1][0]} of "
                f"{cfg.train.num_steps}" + (f", model in {export}" if export.is_dir() else "")
                + "; nothing to train. To train more, start a new run (launch.name=<new name>)"
                f", optionally from this one: checkpoint.resume_from={ckpts[-1][1]}")
    return None


OWNER_FILE = "SLURM_JOB"  # the id of the SLURM job that last ran in the run directory


def slurm_job_alive(job_id: str) -> bool:
    """Whether SLURM still lists the job as pending or running (False when squeue cannot say)."""
    import subprocess
    try:
        out = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True,
                             text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return out.returncode == 0 and out.stdout.strip() not in ("", "COMPLETED", "COMPLETING")


def claim_run_dir(run_dir: Path, job_id: str, alive=slurm_job_alive,
                  wait_s: float = 30.0) -> None:
    """Global rank 0 of a SLURM job, before anything is written: the run directory belongs to
    one job at a time. A requeue of the same job keeps it; another job that SLURM still lists
    is refused (two jobs would overwrite each other's checkpoints); the claim of a job SLURM no
    longer lists is taken over. Atomic: of jobs starting at once, exactly one gets the claim
    (a new claim is hard-linked into place, which fails if one exists; a takeover first
    creates a token file named after the claim it replaces, which only one job can)."""
    if not job_id:
        return
    owner = Path(run_dir) / OWNER_FILE
    owner.parent.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + wait_s
    while not _link_claim(owner, job_id):
        other, stamp = _read_claim(owner)
        if other is None:
            continue  # removed since: try to create it again
        if other == job_id:
            return
        if other and alive(other):
            raise RerunRefused(
                f"{run_dir} is in use by SLURM job {other}, which is still queued or running; "
                f"two jobs in one run directory overwrite each other's checkpoints. Wait for it "
                f"(sbatch --dependency=afterany:{other} ...), cancel it (scancel {other}), or "
                "start a run of its own (launch.name=<new name>)")
        if _takeover_token(owner, other, stamp):
            _write_claim(owner, job_id)
            return
        if time.monotonic() > deadline:  # the job that took the token died before writing
            raise RerunRefused(
                f"{run_dir}: another job is taking over the claim of finished SLURM job "
                f"{other or '(none)'} ({owner}) and has not written its own for {wait_s:g} s; "
                f"if no job runs there, delete {owner} and resubmit")
        time.sleep(0.05)  # another job took the token: its claim lands next


CLAIMS_DIR = ".claims"  # takeover tokens, one per replaced claim (never reused, so kept)


def _link_claim(owner: Path, job_id: str) -> bool:
    """Create `owner` holding `job_id`, whole, iff it does not exist (link(2) is atomic and
    never replaces; an NFS link retried after a lost reply says it exists: the caller then
    reads back its own job id)."""
    tmp = _claim_file(owner, job_id)
    try:
        os.link(tmp, owner)
        return True
    except FileExistsError:
        return False
    finally:
        tmp.unlink()


def _read_claim(owner: Path) -> tuple:
    """(job id, stamp of this claim file) or (None, None) when there is none."""
    try:
        with open(owner) as f:
            st = os.fstat(f.fileno())
            return f.read().strip(), f"{st.st_ino}.{st.st_mtime_ns}"
    except FileNotFoundError:
        return None, None


def _takeover_token(owner: Path, other: str, stamp: str) -> bool:
    """Whether this job is the one to replace the claim (`other`, `stamp`): the first to create
    its token."""
    claims = owner.parent / CLAIMS_DIR
    claims.mkdir(exist_ok=True)
    try:
        os.close(os.open(claims / f"after_{other or 'none'}.{stamp}",
                         os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        return True
    except FileExistsError:
        return False


def _write_claim(owner: Path, job_id: str) -> None:
    os.replace(_claim_file(owner, job_id), owner)


def _claim_file(owner: Path, job_id: str) -> Path:
    """A private file beside `owner` holding `job_id`, to be linked or renamed into place."""
    tmp = owner.with_name(f".{OWNER_FILE}.{job_id}.{os.getpid()}.{threading.get_ident()}.tmp")
    tmp.write_text(job_id + "\n")
    return tmp


def _failure_file(run_dir: Path, rank: int) -> Path:
    return Path(run_dir) / "logs" / f"failed_rank{rank}.txt"


def clear_failure(run_dir: Path, rank: int) -> None:
    """A new attempt starts: forget why this rank failed last time."""
    _failure_file(run_dir, rank).unlink(missing_ok=True)


def record_failure(run_dir: Path, rank: int, exc: BaseException) -> None:
    """One line for the launcher's closing message: the exception and where in hpc_rlhf it
    was raised (the full traceback stays in logs/rank<R>.log)."""
    import traceback
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if "hpc_rlhf" in f.filename]
    where = ""
    if frames:
        f = frames[-1]
        where = f" (in {f.name}, {Path(f.filename).name}:{f.lineno})"
    message = (str(exc).strip().splitlines() or [""])[0][:300]
    try:
        _failure_file(run_dir, rank).write_text(f"{type(exc).__name__}: {message}{where}\n")
    except OSError:
        pass


def failure_line(run_dir: Path, since: float = 0.0) -> str | None:
    """`FAILED on rank R: <reason>; full log: ...` for the rank that failed first (among the
    failure files written after `since`, a time.time()), or None."""
    files = sorted((f for f in Path(run_dir).glob("logs/failed_rank*.txt")
                    if f.stat().st_mtime >= since), key=lambda f: f.stat().st_mtime)
    if not files:
        return None
    rank = files[0].stem.removeprefix("failed_rank")
    others = f" ({len(files) - 1} more ranks failed after it)" if len(files) > 1 else ""
    return (f"FAILED on rank {rank}: {files[0].read_text().strip()}{others}; full log: "
            f"{Path(run_dir) / 'logs' / f'rank{rank}.log'}")
