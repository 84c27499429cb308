"""Every metric and control collective of hpc_rlhf, with its tensors on the group's device.

NCCL refuses CPU tensors, and on GPU the default world is NCCL: a CPU tensor reduced over it
crashes the first multi-GPU step (world size 1 returns early and hides it). The functions here
take Python values, build the tensor on the device the group's backend needs (CUDA for NCCL,
CPU for gloo), reduce, and return Python values. Choice: move tensors rather than create
default worlds as "cpu:gloo,cuda:nccl", because vLLM and DeepSpeed read the default backend
and expect plain "nccl" there. Control messages are a few numbers per step; the copy is free.

`group` is None (the default world), a group of the default world (dist.new_group), or a
standalone process group (ProcessGroupGloo / ProcessGroupNCCL made by Topology for the job and
sync groups), whose methods are called directly since the default world does not know it.
The weight-sync transport and the ring-attention kernels keep their own collectives (large
tensors that already live on the right device).
"""
from __future__ import annotations

import os
import pickle
from typing import Any, NoReturn, Sequence

import torch
import torch.distributed as dist

_OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}


def is_standalone(group) -> bool:
    """A process group that the default world does not know (made by its constructor)."""
    if group is None or group is dist.group.WORLD:
        return False
    return group not in dist.distributed_c10d._world.pg_map


def backend_of(group=None) -> str:
    """'nccl', 'gloo', ... of `group`; 'none' outside an initialised world."""
    if is_standalone(group):
        return group.name().lower()
    if not dist.is_initialized():
        return "none"
    return str(dist.get_backend(group)).lower()


def device_of(group=None) -> torch.device:
    """Where a tensor must live to travel over `group`: the current CUDA device for NCCL."""
    if "nccl" in backend_of(group):
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def size_of(group=None) -> int:
    if is_standalone(group):
        return group.size()
    return dist.get_world_size(group) if dist.is_initialized() else 1


def _no_world(group) -> bool:
    """Nothing to talk to: no process group at all. A world of one still runs the collective,
    so a one-GPU run exercises the device placement that NCCL demands."""
    return group is None and not dist.is_initialized()


def all_reduce(tensor: torch.Tensor, op: str = "sum", group=None) -> torch.Tensor:
    """Reduce `tensor` over `group` and return the result on `tensor`'s own device (in place
    when the tensor already lives on the group's device)."""
    if _no_world(group):
        return tensor
    dev = device_of(group)
    t = tensor if tensor.device == dev else tensor.to(dev)
    if is_standalone(group):
        opts = dist.AllreduceOptions()
        opts.reduceOp = _OPS[op]
        group.allreduce([t], opts).wait()
    else:
        dist.all_reduce(t, op=_OPS[op], group=group)
    if t is not tensor:
        tensor.copy_(t)
    return tensor


def reduce_values(values: Sequence[float], op: str = "sum", group=None,
                  dtype: torch.dtype = torch.float64) -> list:
    """Element-wise sum / max / min of a list of numbers over `group` (one collective)."""
    if not values or _no_world(group):
        return list(values)
    t = torch.tensor(list(values), dtype=dtype)
    return all_reduce(t, op, group).tolist()


def mean_metrics(metrics: dict, group=None) -> dict:
    """The mean of every value of a {name: number} dict over `group`, names sorted so every
    rank packs the same order."""
    if _no_world(group):
        return dict(metrics)
    n, keys = size_of(group), sorted(metrics)
    sums = reduce_values([float(metrics[k]) for k in keys], "sum", group)
    return {k: v / n for k, v in zip(keys, sums)}


def mean_present_metrics(metrics: dict, group=None) -> dict:
    """Per name, the mean over the ranks of `group` that have it: for metrics whose names a
    rank cannot know in advance (a user reward function's extra_logs). Same dict on every
    rank. Two collectives (names, then sums and counts)."""
    if _no_world(group):
        return dict(metrics)
    keys = sorted({k for part in gather_objects(sorted(metrics), group) for k in part})
    if not keys:
        return {}
    sums = reduce_values([float(metrics.get(k, 0.0)) for k in keys]
                         + [1.0 if k in metrics else 0.0 for k in keys], "sum", group)
    return {k: v / c for k, v, c in zip(keys, sums[:len(keys)], sums[len(keys):])}


def max_int(value: int, group=None) -> int:
    return int(reduce_values([int(value)], "max", group, torch.long)[0])


def any_flag(flag: bool, group=None) -> bool:
    """True on every rank if it is true on any rank."""
    return bool(max_int(1 if flag else 0, group))


def all_flag(flag: bool, group=None) -> bool:
    """True on every rank if it is true on every rank."""
    return not any_flag(not flag, group)


def gather_objects(obj: Any, group=None) -> list:
    """Every rank's picklable `obj`, in group-rank order."""
    if _no_world(group):
        return [obj]
    n = size_of(group)
    if not is_standalone(group):
        out: list = [None] * n
        dist.all_gather_object(out, obj, group=group)  # places its buffers for the backend
        return out
    dev = device_of(group)
    data = torch.frombuffer(bytearray(pickle.dumps(obj)), dtype=torch.uint8).to(dev)
    size = torch.tensor([data.numel()], dtype=torch.long, device=dev)
    sizes = [torch.zeros(1, dtype=torch.long, device=dev) for _ in range(n)]
    group.allgather([sizes], [size]).wait()
    longest = int(max(s.item() for s in sizes))
    padded = torch.zeros(longest, dtype=torch.uint8, device=dev)
    padded[:data.numel()] = data
    parts = [torch.zeros(longest, dtype=torch.uint8, device=dev) for _ in range(n)]
    group.allgather([parts], [padded]).wait()
    return [pickle.loads(p[:int(s.item())].cpu().numpy().tobytes()) for p, s in zip(parts, sizes)]


def broadcast_value(value: int, src: int = 0, group=None) -> int:
    """Group rank `src`'s integer on every rank."""
    if _no_world(group):
        return int(value)
    t = torch.tensor([int(value)], dtype=torch.long, device=device_of(group))
    if is_standalone(group):
        group.broadcast(t, src).wait()
    else:
        dist.broadcast(t, group=group, group_src=src)
    return int(t.item())


def barrier(group=None) -> None:
    """Every rank of `group` reaches this point (an all-reduce: works on every backend and on
    standalone groups, and with NCCL needs no device_ids)."""
    all_reduce(torch.zeros(1), "sum", group)


_teardown_registered = [False]


def destroy_world_at_exit() -> None:
    """Destroy the default world (and its groups) at interpreter exit, while Python is still
    alive. For code that creates the world itself (the strategy in a plain script): a gloo
    world left for finalization can abort a finished process (SIGABRT, "terminate called
    without an active exception"), since its worker threads still hold async work whose
    tensors are freed after the interpreter is gone. Idempotent; a world already destroyed
    is left alone."""
    if _teardown_registered[0]:
        return
    _teardown_registered[0] = True
    import atexit

    def _destroy() -> None:
        if dist.is_available() and dist.is_initialized():
            try:
                dist.destroy_process_group()
            except (RuntimeError, ValueError):  # torn down elsewhere (vLLM shutdown)
                pass
    atexit.register(_destroy)


def end_process(code: int = 0, hang_s: float = 10.0) -> NoReturn:
    """End a rank whose program has returned, without interpreter finalization.

    Frees what the program left (a gc pass: ZeRO-3 engines hold reference cycles and async
    work), destroys the default world and its groups, runs the atexit handlers (vLLM engine
    shutdown, multiprocessing children, loggers), flushes stdio, then os._exit(code). The
    C++ static destructors and module teardown that a normal exit runs afterwards are where a
    gloo group that outlived the program ends a finished rank: SIGABRT ("terminate called
    without an active exception") when its worker threads are destroyed joinable, or a hang in
    its destructor waiting on work that an exited peer never completes (torchrun then kills
    the rank after its shutdown timeout). A teardown still running after `hang_s` seconds
    exits with `code` anyway, with a line saying so: the program's work is already done."""
    import atexit
    import gc
    import logging
    import sys
    import threading

    def _hung() -> None:
        print(f"[teardown] process-group teardown still running after {hang_s:.0f}s; "
              f"exiting {code} without it", file=sys.__stderr__, flush=True)
        os._exit(code)
    timer = threading.Timer(hang_s, _hung)
    timer.daemon = True
    timer.start()
    gc.collect()
    if dist.is_available() and dist.is_initialized():
        try:
            dist.destroy_process_group()
        except (RuntimeError, ValueError):  # torn down elsewhere (vLLM shutdown)
            pass
    gc.collect()
    atexit._run_exitfuncs()
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
        try:
            stream.flush()
        except (AttributeError, OSError, ValueError):
            pass
    os._exit(code)
