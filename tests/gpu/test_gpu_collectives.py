"""The collective helpers and the weight-sync transport with CUDA tensors.

- every helper of hpc_rlhf.topology.collectives on a one-rank NCCL world (the default world
  and a standalone ProcessGroupNCCL, as Topology makes for the sync group): values go in as
  Python numbers or CPU tensors and must come back right; NCCL refuses CPU tensors, so any
  helper that forgot to move them fails here.
- BroadcastSender -> BroadcastReceiver between two processes with CUDA buffers on both sides
  (the staging ring and the receive pool on the GPU), byte-exact. Two NCCL ranks cannot share
  one GPU, so the two processes talk over gloo, which carries CUDA tensors through the host.
"""
from __future__ import annotations

import json
import os
from datetime import timedelta
from pathlib import Path

import pytest
import torch

from gpulib import record
from testlib import spawn

pytestmark = pytest.mark.gpu


def test_every_collective_helper_on_a_one_rank_nccl_world():
    import torch.distributed as dist

    from hpc_rlhf.topology import collectives as c
    torch.cuda.set_device(0)
    store = dist.HashStore()
    dist.init_process_group("nccl", store=store, rank=0, world_size=1)
    try:
        opts = dist.ProcessGroupNCCL.Options()
        opts._timeout = timedelta(seconds=60)
        standalone = dist.ProcessGroupNCCL(dist.PrefixStore("sync", store), 0, 1, opts)
        for group in (None, standalone):
            assert "nccl" in c.backend_of(group) and c.device_of(group).type == "cuda"
            t = torch.tensor([1.0, 2.0])                       # a CPU tensor in, CPU out
            assert c.all_reduce(t, "sum", group) is t and t.tolist() == [1.0, 2.0]
            g = torch.tensor([3.0], device="cuda")              # a CUDA tensor stays in place
            assert c.all_reduce(g, "max", group) is g and g.item() == 3.0
            assert c.mean_metrics({"a": 1.5, "b": -2.0}, group) == {"a": 1.5, "b": -2.0}
            assert c.reduce_values([4, 5], "min", group, torch.long) == [4, 5]
            assert c.max_int(7, group) == 7
            assert c.any_flag(True, group) and not c.any_flag(False, group)
            assert c.all_flag(True, group) and not c.all_flag(False, group)
            assert c.gather_objects({"x": [1, 2]}, group) == [{"x": [1, 2]}]
            assert c.broadcast_value(11, 0, group) == 11
            c.barrier(group)
        record("collectives on NCCL (world + standalone)", "ok", "all 10 helpers")
    finally:
        dist.destroy_process_group()


def _sync_worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    import torch.distributed as dist

    from hpc_rlhf.weight_sync import BroadcastReceiver, BroadcastSender
    torch.cuda.set_device(0)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    pg = dist.ProcessGroupGloo(dist.PrefixStore("sync", dist.distributed_c10d._get_default_store()),
                               rank, world, timedelta(seconds=120))
    gen = torch.Generator(device="cuda").manual_seed(0)
    tensors = [(f"w{i}", torch.randn(shape, device="cuda", generator=gen, dtype=dtype))
               for i, (shape, dtype) in enumerate([((1024, 512), torch.bfloat16),
                                                   ((3, 5), torch.float32), ((), torch.float32),
                                                   ((4096, 1024), torch.bfloat16),
                                                   ((17,), torch.float16)])]
    if rank == 0:
        sender = BroadcastSender(pg, 0, bucket_bytes=4 << 20, device="cuda", verify=True)
        assert sender.device.type == "cuda"
        for _ in range(2):  # twice: buffers are reused across syncs
            sender.send(iter(tensors))
    else:
        receiver = BroadcastReceiver(pg, 0, device="cuda")
        exact = []
        for _ in range(2):
            got = [(n, t.clone()) for n, t in receiver.receive()]
            exact.append([n for n, _ in got] == [n for n, _ in tensors] and all(
                t.device.type == "cuda" and t.dtype == w.dtype and torch.equal(t, w)
                for (_, t), (_, w) in zip(got, tensors)))
        Path(out, "sync.json").write_text(json.dumps(exact))
    dist.destroy_process_group()


def test_weight_sync_with_cuda_buffers_is_byte_exact(tmp_path):
    spawn(_sync_worker, 2, (str(tmp_path),), timeout_s=180)
    exact = json.loads((tmp_path / "sync.json").read_text())
    assert exact == [True, True]
    record("weight sync, CUDA buffers both sides", "ok", "2 syncs byte-exact, checksums on")
