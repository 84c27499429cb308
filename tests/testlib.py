"""Helpers shared by test modules (tests/ is on sys.path: the root conftest lives here).

Rules the suite keeps (issue: a suite that cannot flake on a loaded 2-core machine):
- Deadlines are measured from the event they are about (a marker file or log line the code
  writes), never from a submission or a process start, and every bound goes through
  `scaled()`: HPC_RLHF_TEST_SLOWDOWN (default 1) multiplies them all on slow machines.
- Synchronisation waits for a marker (`wait_until`, `wait_for_file`), never a fixed sleep.
- Ports are bound once and handed over: `spawn` hosts the TCPStore in this process on port 0
  and gives the children its port; torchrun jobs use `TORCHRUN_ENDPOINT` (port 0: the agent
  binds a free port itself and tells its workers).
"""
from __future__ import annotations

import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, TypeVar

T = TypeVar("T")

REPO = Path(__file__).resolve().parents[1]
SLOWDOWN = float(os.environ.get("HPC_RLHF_TEST_SLOWDOWN", "1"))
# A single-node torchrun rendezvous endpoint with no port race: c10d binds port 0.
TORCHRUN_ENDPOINT = "127.0.0.1:0"


def scaled(seconds: float) -> float:
    """A time bound of the suite, multiplied by HPC_RLHF_TEST_SLOWDOWN."""
    return seconds * SLOWDOWN


def wait_until(predicate: Callable[[], T], timeout_s: float, what: str,
               interval_s: float = 0.05) -> T:
    """Poll `predicate` until it returns a true value (returned); fail naming `what` after
    scaled(timeout_s)."""
    deadline = time.monotonic() + scaled(timeout_s)
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {scaled(timeout_s):.0f} s waiting for {what}")
        time.sleep(interval_s)


def wait_for_file(path: Path, timeout_s: float, what: str | None = None) -> Path:
    wait_until(lambda: Path(path).exists(), timeout_s, what or f"{path} to appear")
    return Path(path)


@contextmanager
def store_server():
    """A TCPStore hosted by this process on a port the OS picked; yields its port. Children
    join it as clients (TORCHELASTIC_USE_AGENT_STORE=True, as under torchrun)."""
    from datetime import timedelta

    import torch.distributed as dist
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False,
                          timeout=timedelta(seconds=scaled(120)))
    try:
        yield store.port
    finally:
        del store


@contextmanager
def _child_env(**env: str):
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _rank_main(rank: int, fn, *args) -> None:
    """A spawned rank: dies with its parent (PR_SET_PDEATHSIG), so a killed pytest leaves no
    orphaned ranks; runs fn; then ends as a launched rank does (collectives.end_process: the
    groups fn left destroyed, no interpreter finalization). A gloo group alive at interpreter
    exit can abort a rank (SIGABRT, "terminate called without an active exception") or hang it
    after fn succeeded."""
    import ctypes
    import signal
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    fn(rank, *args)
    from hpc_rlhf.topology.collectives import end_process
    end_process(0)  # as a launched rank ends (launch/main.entry)


def spawn(fn, world: int, args: tuple, timeout_s: float) -> None:
    """Run fn(rank, world, port, *args) on `world` spawned processes; fail (never hang) past
    scaled(timeout_s). `port` is a TCPStore this process hosts: a worker sets MASTER_ADDR=
    127.0.0.1, MASTER_PORT=port and calls init_process_group (env://) once; it joins as a
    client. (A second init in the same process would read the first world's stale keys.)
    The ranks die with this process, and their process groups are destroyed after fn."""
    import torch.multiprocessing as mp
    with store_server() as port, _child_env(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                                            TORCHELASTIC_USE_AGENT_STORE="True"):
        ctx = mp.start_processes(_rank_main, args=(fn, world, port, *args), nprocs=world,
                                 join=False, start_method="spawn")
        deadline = time.monotonic() + scaled(timeout_s)
        while not ctx.join(timeout=1):
            if time.monotonic() > deadline:
                for p in ctx.processes:
                    if p.is_alive():
                        p.kill()
                raise TimeoutError(f"{fn.__name__} did not finish within {scaled(timeout_s):.0f} s")


# ==== timed process output; SLURM cluster ports (tests/faults, tests/slurm, topology tests) ====
# (one block, appended: other helpers go above or below it)
import subprocess as _subprocess  # noqa: E402
import threading as _threading  # noqa: E402


class TimedOutput:
    """Reads a process's stdout (stderr merged into it) in a thread and time-stamps every line,
    so a deadline can start at the line that announces its event (a fault injected, a rank
    failing on purpose) instead of at the process start, which would also count imports,
    rendezvous and scheduling."""

    def __init__(self, proc: _subprocess.Popen):
        self.proc = proc
        self.lines: list[tuple[float, str]] = []
        self._reader = _threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append((time.monotonic(), line))

    @property
    def text(self) -> str:
        return "".join(line for _, line in list(self.lines))

    def first(self, needle: str) -> float | None:
        """When the first line containing `needle` was read (time.monotonic), or None."""
        return next((t for t, line in list(self.lines) if needle in line), None)

    def wait(self, timeout_s: float) -> tuple[int, float]:
        """(exit code, time.monotonic() of the exit); fail with the output's tail past
        scaled(timeout_s) (the caller kills what it started)."""
        try:
            rc = self.proc.wait(timeout=scaled(timeout_s))
        except _subprocess.TimeoutExpired:
            raise AssertionError(f"{self.proc.args!r} still running after "
                                 f"{scaled(timeout_s):.0f} s:\n{self.text[-5000:]}") from None
        t_exit = time.monotonic()
        self._reader.join(timeout=scaled(10))  # the rest of the output (pipe closed at exit)
        return rc, t_exit


def slurm_rdzv_ports(slurm_conf: Path) -> range:
    """Ports for torchrun rendezvous on the head node of the local test cluster's jobs that no
    other cluster on this host uses: scripts/slurm_cluster.sh gives each cluster its own block
    of 10 ports from SlurmctldPort on (picked under a host-wide lock; the daemons use the first
    3), so its jobs take the other 7 in turn. (20000 + job id repeats across clusters: every
    cluster numbers its jobs from 1.)"""
    import re
    ctld = int(re.search(r"^SlurmctldPort=(\d+)$", Path(slurm_conf).read_text(), re.M).group(1))
    return range(ctld + 3, ctld + 10)


class ServedInThread:
    """An HTTP server already bound to a port (bind port 0 and read it back: no race for the
    port), served from a daemon thread while the `with` block runs; `url` ends in `path`."""

    def __init__(self, server, path: str = "/"):
        self.server = server
        self.url = f"http://127.0.0.1:{server.server_address[1]}{path}"
        self.thread = _threading.Thread(target=server.serve_forever,
                                        kwargs={"poll_interval": 0.05}, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()
