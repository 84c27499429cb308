"""Preemption signals -> a flag the training loops poll; REQUEUE marker for the batch script.

    install()                        # once, in the rank's main thread, before heavy imports
    ...
    vote = agreed_stop_vote()        # poll once per step (collective): the MAX over ranks,
    if vote:                         #   so every rank stops at the same step and knows why;
        save(...)                    #   it already called stop_agreed(vote)
        request_requeue(run_dir)     # global rank 0 only; then barrier and return
        return

SIGUSR1 (SLURM's `--signal=B:USR1@lead`, forwarded by the sbatch script / our submitit task ->
srun -> torchrun -> ranks) only sets the flag: the job has `launch.signal_lead_s` to save.
A rank may get it twice (from the step and from torchrun): the flag is idempotent.
SIGUSR2 is treated like SIGUSR1: it is submitit's preemption signal, and SLURM delivers a
step signal to every process of the step, not only to the task. After either, the program
checkpoints and `request_requeue` writes the marker: the launcher requeues the job.

SIGTERM means one of three things, and the rank cannot tell which when it arrives:
  1. SLURM preempts the job (PreemptMode=REQUEUE/CANCEL): SIGCONT+SIGTERM to every process
     of every step (torchrun and the ranks; not the batch shell), SIGKILL after the
     partition's GraceTime;
  2. scancel / the time limit: the same SIGTERM, SIGKILL after KillWait;
  3. torchrun stopping the survivors after another rank died: those ranks are usually blocked
     inside a C++ collective where a Python signal handler never runs.
So SIGTERM sets the flag (the program checkpoints at the next step boundary) and arms a
watchdog: a thread learns about the signal from `signal.set_wakeup_fd` (written by the
C-level handler even while the main thread is blocked) and, unless the program called
`stop_agreed()` within `HPC_RLHF_TERM_GRACE_S` (default 10) seconds, dumps every thread's
stack to stderr and hard-exits with 128+15. `stop_agreed()` is the proof that this rank is not
stuck: every rank has just finished a collective after the signal, so no peer is dead; the save
then runs with no watchdog (collective timeouts and SLURM's SIGKILL still bound it). A rank
that cannot reach the step boundary in the grace exits without saving: checkpoints are written
atomically, so the previous complete one is what the next run resumes from. Choose the grace
below GraceTime/KillWait minus the save time; 0 means "never save on SIGTERM, exit at once".
Only the first SIGTERM arms the watchdog (torchrun forwards SLURM's SIGTERM, so ranks get two).

SIGINT (Ctrl-C; the local launcher forwards it to the ranks) takes the SIGTERM path without
its timer: checkpoint at the next step boundary however long the step takes (someone is
watching), no requeue, one line saying what was saved, no KeyboardInterrupt tracebacks; a
second SIGINT exits at once (130) without saving. The parent (torchrun) dying takes the
SIGTERM path, timer included: a watcher thread sees the rank re-parented and sets the flag,
so no rank trains on as an orphan.

Requeue after SIGTERM: SLURM requeues a preempted job only if the job is still running when
GraceTime ends; a job that checkpoints and exits inside the grace ends COMPLETED and is never
rerun (seen on SLURM 22.05; tests/slurm/test_rl_preempt_slurm.py). So after a SIGTERM-only
stop `request_requeue` writes the marker iff SLURM says the job was preempted (`scontrol show
job`: PreemptTime set); after scancel, a time limit or a dead peer it writes nothing.
"""
from __future__ import annotations

import faulthandler
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

REQUEUE_FILE = "REQUEUE"
_WARNINGS = (signal.SIGUSR1, signal.SIGUSR2)
_STOPS = (signal.SIGTERM, signal.SIGINT)  # stop at the next step boundary, no requeue
_flag = threading.Event()
_lock = threading.Lock()
# warned: USR1/USR2 or request_checkpoint() (a requeue is wanted); agreed: stop_agreed() ran;
# timer: the armed SIGTERM watchdog, if any.
_state: dict = {"installed": False, "signals": [], "warned": False, "agreed": False,
                "timer": None, "armed": False, "sigints": 0}


def checkpoint_requested() -> bool:
    """True once SIGUSR1, SIGUSR2 or SIGTERM arrived (stays true)."""
    return _flag.is_set()


def received_signals() -> list:
    """Names of the signals received so far, in order (for logs)."""
    return list(_state["signals"])


def stop_was_agreed() -> bool:
    """True once the ranks agreed to stop on a signal (`stop_agreed`)."""
    return bool(_state["agreed"])


def request_checkpoint() -> None:
    """Set the flag from code (tests, a time budget check); counts as a warning (requeue)."""
    _state["warned"] = True
    _flag.set()


STOP_TERM, STOP_WARNED = 1, 2


def stop_vote() -> int:
    """This rank's stop vote: 0 no signal, STOP_TERM SIGTERM only, STOP_WARNED a warning
    (USR1/USR2/request_checkpoint). Programs agree on the MAX over all ranks: rank 0 must know
    that some other rank was warned to write the REQUEUE marker."""
    if not _flag.is_set():
        return 0
    return STOP_WARNED if _state["warned"] else STOP_TERM


def stop_agreed(vote: int = STOP_TERM) -> None:
    """Every rank agreed to stop at this step boundary (`vote`: the MAX of `stop_vote()` over
    ranks): record whether any rank was warned, and disarm the SIGTERM watchdog so the
    checkpoint may take as long as the scheduler's grace allows (see the module doc)."""
    with _lock:
        _state["agreed"] = True
        if vote >= STOP_WARNED:
            _state["warned"] = True
        if _state["timer"] is not None:
            _state["timer"].cancel()
            _state["timer"] = None


def agreed_stop_vote(group=None) -> int:
    """Collective, once per step boundary on every rank of the default world (or of `group`, a
    standalone process group such as the disaggregated job group): the MAX of every rank's
    `stop_vote()`; when it is non-zero, `stop_agreed(vote)` has run on this rank."""
    from hpc_rlhf.topology import collectives
    vote = collectives.max_int(stop_vote(), group)
    if vote:
        stop_agreed(vote)  # every rank is here: disarm the SIGTERM watchdog for the save
    return vote


def slurm_preempted(job_id: str | None = None) -> bool:
    """True if SLURM marked job `job_id` (default $SLURM_JOB_ID) preempted (PreemptTime set).
    False outside SLURM or when scontrol fails (the reason goes to stderr)."""
    job_id = job_id or os.environ.get("SLURM_JOB_ID")
    if not job_id:
        return False
    try:
        out = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True,
                             text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        sys.stderr.write(f"[signals] scontrol show job {job_id} failed ({e}); not requeueing\n")
        return False
    fields = dict(w.split("=", 1) for w in out.stdout.split() if "=" in w)
    return fields.get("PreemptTime", "None") not in ("None", "Unknown", "")


def request_requeue(run_dir: str | os.PathLike) -> Path | None:
    """After a signal-triggered checkpoint (global rank 0 only): write the REQUEUE marker if a
    requeue is wanted (a warning signal, or SIGTERM of a SLURM preemption; module doc) and
    return its path, else None. The sbatch script / submitit task requeues the job when it sees
    the marker after torchrun ends."""
    if not _state["warned"] and not slurm_preempted():
        return None
    path = Path(run_dir) / REQUEUE_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch()
    return path


def requeue_after_stop(run_dir: str | os.PathLike, enabled: bool = True) -> str:
    """Global rank 0, after the checkpoint of a signal-stopped run: request the requeue where
    one is wanted (request_requeue) and `enabled` (launch.requeue); what happened, for the
    closing line."""
    if not enabled:
        return "no requeue (launch.requeue=false)"
    if request_requeue(run_dir) is not None:
        return "requeue requested"
    if "SIGINT" in _state["signals"] or "PARENT_EXIT" in _state["signals"]:
        return "interrupted; rerun the same command to resume"
    return "no requeue (SIGTERM, not a preemption)"


def requeue_requested(run_dir: str | os.PathLike) -> bool:
    return (Path(run_dir) / REQUEUE_FILE).exists()


def _on_signal(signum, frame) -> None:
    if signum in _WARNINGS:
        _state["warned"] = True
    _flag.set()
    _note(signal.Signals(signum).name)


def _note(name: str) -> None:
    """Record a stop reason for the logs (a repeat of the last one is not listed twice)."""
    if not _state["signals"] or _state["signals"][-1] != name:
        _state["signals"].append(name)


def _arm(grace_s: float, rank: str) -> None:
    """Start the hard-exit timer on the first SIGTERM, unless the ranks already agreed."""
    with _lock:
        if _state["armed"] or _state["agreed"]:
            return
        _state["armed"] = True
        timer = threading.Timer(grace_s, _hard_exit, (rank, grace_s))
        timer.daemon = True
        _state["timer"] = timer
        timer.start()


def _watchdog(read_fd: int, grace_s: float, rank: str) -> None:
    while True:
        try:
            data = os.read(read_fd, 64)
        except OSError:
            return
        if not data:
            return
        for signum in data:
            if signum in _WARNINGS:
                _state["warned"] = True
            if signum in (*_WARNINGS, *_STOPS):
                _flag.set()
            if signum == signal.SIGTERM:
                _arm(grace_s, rank)
            if signum == signal.SIGINT:
                _state["sigints"] += 1
                if _state["sigints"] > 1:  # Ctrl-C twice: the user does not want to wait
                    sys.stderr.write(f"[rank {rank}] SIGINT again: exiting without saving\n")
                    sys.stderr.flush()
                    os._exit(130)


def _hard_exit(rank: str, grace_s: float) -> None:
    with _lock:
        if _state["agreed"]:  # stop_agreed() won the race
            return
    sys.stderr.write(f"[rank {rank}] SIGTERM: no checkpoint agreed within {grace_s:g}s "
                     "(HPC_RLHF_TERM_GRACE_S; a long step, or blocked in a collective with a "
                     "dead peer); stacks follow, exiting 143 without saving\n")
    faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
    sys.stderr.flush()
    os._exit(143)


def install(grace_s: float | None = None) -> None:
    """Install the handlers and the SIGTERM watchdog (main thread; idempotent)."""
    if _state["installed"]:
        return
    if grace_s is None:
        grace_s = float(os.environ.get("HPC_RLHF_TERM_GRACE_S", "10"))
    signal.signal(signal.SIGUSR1, _on_signal)
    signal.signal(signal.SIGUSR2, _on_signal)
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    r, w = os.pipe()
    os.set_blocking(w, False)
    signal.set_wakeup_fd(w, warn_on_full_buffer=False)
    rank = os.environ.get("HPC_RLHF_GLOBAL_RANK", os.environ.get("RANK", "0"))
    threading.Thread(target=_watchdog, args=(r, grace_s, rank), daemon=True,
                     name="hpc_rlhf-sigterm-watchdog").start()
    if os.environ.get("TORCHELASTIC_RUN_ID"):  # started by torchrun: stop if it dies
        threading.Thread(target=_watch_parent, args=(os.getppid(), grace_s, rank), daemon=True,
                         name="hpc_rlhf-parent-watch").start()
    _state["installed"] = True


def _watch_parent(parent: int, grace_s: float, rank: str, poll_s: float = 1.0) -> None:
    """The rank's parent (the torchrun agent) died, e.g. SIGKILLed with its launcher: the rank
    was re-parented. Take the SIGTERM path (checkpoint at the step boundary within the grace,
    else exit), so no rank of a dead job trains on in the background."""
    import time
    while os.getppid() == parent:
        time.sleep(poll_s)
    sys.stderr.write(f"[rank {rank}] the torchrun agent (pid {parent}) exited; stopping\n")
    _note("PARENT_EXIT")
    _flag.set()
    _arm(grace_s, rank)
