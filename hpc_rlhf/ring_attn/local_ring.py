"""Run a function on a local gloo ring of processes (tests, benchmarks, CPU experiments).

Production groups come from the topology module; this is the small seam that lets ring
attention run for real on one machine: spawned processes, a TCPStore the parent hosts on a
port the OS picks (bound once and handed to the ranks: a port found free first and bound later
can be taken in between), a hard timeout so a broken collective never hangs CI, and per-rank
return values collected through a queue.
"""
from __future__ import annotations

import pickle
import queue
import time
import traceback
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _worker(rank, world, port, fn, args, results, timeout_s, threads):
    torch.set_num_threads(threads)  # W ranks share the machine's cores
    try:
        timeout = timedelta(seconds=timeout_s)
        store = dist.TCPStore("127.0.0.1", port, world, is_master=False, timeout=timeout)
        dist.init_process_group("gloo", store=store, rank=rank, world_size=world, timeout=timeout)
        value = fn(rank, world, *args)
        # plain pickle copies tensors by value; the queue's own pickler would hand over shared
        # memory handles that die with this process
        results.put((rank, "ok", pickle.dumps(value)))
    except BaseException:  # report every failure to the parent, including assertion errors
        results.put((rank, "error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_local_ring(fn, world: int, args: tuple = (), timeout_s: float = 120.0,
                   threads_per_rank: int = 1) -> list:
    """Call `fn(rank, world, *args)` in `world` spawned gloo processes; return rank-ordered
    results. Raises RuntimeError with the failing rank's traceback, or on timeout (after
    killing the processes). `fn` must be importable (module level) and its result picklable.
    """
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    # The ranks join this store as clients; it lives until they are gone (finally below).
    store = dist.TCPStore("127.0.0.1", 0, world, is_master=True, wait_for_workers=False,
                          timeout=timedelta(seconds=timeout_s))
    procs = [
        ctx.Process(target=_worker, args=(r, world, store.port, fn, args, results, timeout_s, threads_per_rank), daemon=True)
        for r in range(world)
    ]
    for p in procs:
        p.start()
    out, deadline = {}, time.monotonic() + timeout_s
    try:
        while len(out) < world:
            try:
                rank, status, value = results.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                raise RuntimeError(
                    f"local ring of {world} ranks timed out after {timeout_s}s; "
                    f"finished ranks: {sorted(out)}"
                ) from None
            if status == "error":
                raise RuntimeError(f"rank {rank} of {world} failed:\n{value}")
            out[rank] = pickle.loads(value)
    finally:
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
                p.join()
        del store
    return [out[r] for r in range(world)]
