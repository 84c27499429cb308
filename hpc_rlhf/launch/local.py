"""`python -m hpc_rlhf.submit --local`: the job on this machine, as a user at a terminal meets it.

torchrun runs in its own session, so Ctrl-C reaches the job once, through the launcher
(LocalJob): the first signal asks the ranks to checkpoint at the end of their step, a second
kills the job; nothing of the job outlives the launcher. Its output goes through
console.ConsoleFilter (everything to logs/console.log, our lines and the bar to the console).
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from hpc_rlhf.config import JobConfig
from hpc_rlhf.launch import plan as planlib
from hpc_rlhf.launch.rundir import ENV_RUN_DIR, failure_line


def run_local(cfg: JobConfig, args, run_dir: Path, shutdown_timeout_s: int) -> int:
    """`submit --local`: torchrun on this machine (one node), through LocalJob."""
    # c10d rendezvous on port 0: the torchrun agent binds a free port itself and tells its
    # ranks (a port found free here could be taken before torchrun binds it).
    argv = planlib.torchrun_argv(args.config, args.overrides, 1, cfg.topology.procs_per_node,
                                 "127.0.0.1:0", "local", shutdown_timeout_s,
                                 max_restarts=cfg.launch.max_restarts)
    env = {**os.environ, **planlib.torchrun_env(cfg.launch.max_restarts),
           ENV_RUN_DIR: str(run_dir), "PYTHONUNBUFFERED": "1"}
    if args.program:
        env["HPC_RLHF_PROGRAM"] = args.program
    from hpc_rlhf.launch.console import ConsoleFilter, open_console_log
    log = open_console_log(run_dir)
    log.write(f"[submit] local: {planlib.shell_join(argv)}\n")
    console = ConsoleFilter(sys.stdout, log, verbose=cfg.logging.verbose)
    try:
        return LocalJob(argv, env, run_dir, console).wait()
    finally:
        log.close()


def _pdeathsig_term() -> None:  # in the torchrun child, before exec
    import ctypes
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _children(pid: int) -> list[int]:
    """Direct child pids of `pid` (Linux /proc), [] when it is gone."""
    out = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            out += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            continue
    return out


class LocalJob:
    """torchrun on this machine, in its own session, so that a Ctrl-C reaches the ranks once,
    through here: the first SIGINT/SIGTERM/SIGHUP is forwarded to the ranks (they checkpoint
    at the end of the current step and exit; torchrun then ends cleanly), a second kills the
    ranks and torchrun at once. torchrun gets SIGTERM if this launcher dies (PR_SET_PDEATHSIG),
    and the ranks stop when torchrun dies (signals.py), so no process of the job outlives it."""

    STOP = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

    def __init__(self, argv: list, env: dict, run_dir: Path, console):
        from hpc_rlhf.launch.console import pump
        self.run_dir, self.stops, self.console = run_dir, [], console
        self.t0 = time.time()  # failure files older than this belong to an earlier attempt
        read, write = os.pipe()
        self.proc = subprocess.Popen(argv, env=env, start_new_session=True, stdout=write,
                                     stderr=write, preexec_fn=_pdeathsig_term)
        os.close(write)
        self.pump = pump(read, console)  # the job's output -> console.log, filtered console
        # `submit status|cancel RUN_DIR` find this launcher here
        from hpc_rlhf.launch.jobs import LAUNCHER_PID
        self.pid_file = run_dir / "logs" / LAUNCHER_PID
        self.pid_file.write_text(f"{os.getpid()} {os.uname().nodename}\n")

    def _on_signal(self, signum, frame) -> None:
        self.stops.append(signum)
        name = signal.Signals(signum).name
        ranks = _children(self.proc.pid)
        if len(self.stops) == 1:
            self.console.say(f"[submit] {name}: the ranks checkpoint at the end of the current "
                             "step and exit (again to stop at once, without saving)")
            for pid in ranks or [self.proc.pid]:  # before the ranks start: torchrun itself
                self._send(pid, signal.SIGINT if signum == signal.SIGINT else signal.SIGTERM)
        else:
            self.console.say(f"[submit] {name} again: stopping now; the last complete "
                             "checkpoint is kept")
            for pid in [*ranks, self.proc.pid]:
                self._send(pid, signal.SIGKILL)

    @staticmethod
    def _send(pid: int, sig) -> None:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass

    def wait(self) -> int:
        old = {s: signal.signal(s, self._on_signal) for s in self.STOP}
        try:
            rc = self.proc.wait()
            # The rest of the output: the pipe closes when the job's last process exits (a
            # straggler holding it must not keep the launcher waiting).
            self.pump.join(timeout=10)
        finally:
            for s, h in old.items():
                signal.signal(s, h)
            self.pid_file.unlink(missing_ok=True)
        if self.stops:
            self.console.say(f"[submit] stopped by {signal.Signals(self.stops[0]).name}; rerun "
                             "the same command to resume from the last checkpoint in "
                             f"{self.run_dir}")
            return 128 + self.stops[0]
        if rc != 0:
            line = failure_line(self.run_dir, self.t0) or (
                f"FAILED: torchrun exited {rc}; its output: {self.run_dir / 'logs' / 'console.log'}")
            self.console.say(f"[submit] {line}")
        return rc
