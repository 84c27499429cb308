"""`Topology`: the one object that creates (and destroys) every process group of the job.

Nothing else in hpc_rlhf calls init_process_group / new_group / ProcessGroupGloo.

Store: `torch.distributed.rendezvous("env://")` returns the job's TCPStore. Under torchrun
(TORCHELASTIC_USE_AGENT_STORE=True) that is a client of the store the torchrun agent already
hosts at MASTER_ADDR:MASTER_PORT, fresh for every restart attempt; with no torchrun env at all
we set RANK=0, WORLD_SIZE=1 and a free MASTER_PORT and it hosts its own. This beats opening a
second TCPStore at MASTER_PORT+1 (the spike's trick), which can collide with a port in use.

Worlds (see layout.py): each rank joins its own default world with
`init_process_group(store=PrefixStore("world/<name>", store), rank=world_rank,
world_size=world_size)`, then RANK/WORLD_SIZE (and LOCAL_WORLD_SIZE) are rewritten to those
role-local values because vLLM (external_launcher) and DeepSpeed read them and check them
against the default group. LOCAL_RANK is left alone on purpose: both libraries use it as the
CUDA device index (cuda:LOCAL_RANK), which must stay the rank's GPU on its node. The global
values stay in HPC_RLHF_GLOBAL_RANK / HPC_RLHF_GLOBAL_WORLD_SIZE.

Cross-world groups are standalone process groups on their own PrefixStore, made only by their
members, so they never enter the default world's bookkeeping: call their methods directly
(`pg.broadcast(t, root).wait()`, `pg.allreduce([t]).wait()`), not `dist.broadcast(group=pg)`.
- job group: every rank, gloo (trajectories, control messages, "stop" votes);
- sync group: actor world rank 0 + every rollout rank (weight sync). gloo on CPU; with
  backend nccl it is torch's standalone ProcessGroupNCCL (GPU path untested here: see the gpu
  test); vLLM's StatelessProcessGroup + PyNcclCommunicator is the alternative the weight-sync
  layer may choose instead, from `topo.store` and `topo.layout.sync_ranks`.
Every group gets topology.timeout_s, so a rank stuck in a collective raises instead of hanging.
"""
from __future__ import annotations

import os
import socket
import time
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from hpc_rlhf.config import JobConfig
from hpc_rlhf.topology import collectives
from hpc_rlhf.topology.layout import Layout, RankInfo, build_layout


PEER_FAILURE_MESSAGES = ("Connection closed by peer", "Connection reset by peer",
                         "Broken pipe")


class CollectiveError(RuntimeError):
    """A collective failed or timed out; the message names the rank, group and timeout."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ensure_env() -> None:
    """Single process with no launcher: become a world of one with a private store."""
    if "RANK" not in os.environ and "WORLD_SIZE" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ["MASTER_PORT"] = str(free_port())


def _backend(cfg: JobConfig) -> str:
    b = cfg.topology.backend
    if b == "auto":
        return "nccl" if torch.cuda.is_available() else "gloo"
    return b


@dataclass
class Topology:
    layout: Layout
    rank: int                 # global rank
    info: RankInfo
    store: Any                # the job's store (shared by every rank)
    backend: str
    timeout: timedelta
    groups: dict              # name -> process group (or None where this rank is not a member)
    group_ranks: dict         # name -> global ranks of the group this rank belongs to

    # --- construction ----------------------------------------------------------------------
    @classmethod
    def init(cls, cfg: JobConfig) -> "Topology":
        _ensure_env()
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        layout = build_layout(cfg, world)
        timeout = timedelta(seconds=cfg.topology.timeout_s)
        store, _, _ = next(dist.rendezvous("env://", timeout=timeout))
        backend, info = _backend(cfg), layout.info(rank)
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        os.environ.update(HPC_RLHF_GLOBAL_RANK=str(rank), HPC_RLHF_GLOBAL_WORLD_SIZE=str(world))
        dist.init_process_group(backend, store=dist.PrefixStore(f"world/{info.world}", store),
                                rank=info.world_rank, world_size=info.world_size,
                                timeout=timeout)
        os.environ.update(RANK=str(info.world_rank), WORLD_SIZE=str(info.world_size),
                          LOCAL_WORLD_SIZE=str(sum(1 for g in layout.world_members(info.world)
                                                   if layout.info(g).node == info.node)))
        topo = cls(layout, rank, info, store, backend, timeout, {}, {})
        topo._build_groups()
        return topo

    def _build_groups(self) -> None:
        lay, info = self.layout, self.info
        members = lay.world_members(info.world)
        self.groups["world"] = dist.group.WORLD
        self.group_ranks["world"] = members
        if info.is_trainer:
            for kind in ("dp", "tp", "sp"):
                # new_group is collective over the default world: every member creates every
                # subgroup in the same order, keeps the one it belongs to.
                for local in lay.subgroups(info.world, kind):
                    pg = dist.new_group(list(local), timeout=self.timeout,
                                        group_desc=f"{info.world}/{kind}")
                    if info.world_rank in local:
                        self.groups[kind] = pg
                        self.group_ranks[kind] = tuple(members[i] for i in local)
        if lay.mode == "colocated":
            self.groups["job"] = dist.group.WORLD
            self.group_ranks["job"] = members
        else:
            all_ranks = tuple(range(lay.world_size))
            self._standalone("job", all_ranks, "gloo")
            if self.rank in lay.sync_ranks:
                self._standalone("sync", lay.sync_ranks, self.backend)

    def _standalone(self, name: str, ranks: tuple, backend: str) -> None:
        store = dist.PrefixStore(f"group/{name}", self.store)
        rank, size = ranks.index(self.rank), len(ranks)
        if backend == "gloo":
            pg = dist.ProcessGroupGloo(store, rank, size, self.timeout)
        else:  # pragma: no cover - needs CUDA
            opts = dist.ProcessGroupNCCL.Options()
            opts._timeout = self.timeout
            pg = dist.ProcessGroupNCCL(store, rank, size, opts)
        self.groups[name] = pg
        self.group_ranks[name] = ranks

    # --- accessors -------------------------------------------------------------------------
    @property
    def world_size(self) -> int:
        return self.layout.world_size

    @property
    def roles(self) -> tuple:
        return self.info.roles

    @property
    def is_actor(self) -> bool:
        return "actor" in self.info.roles

    @property
    def is_critic(self) -> bool:
        return "critic" in self.info.roles

    @property
    def is_reward(self) -> bool:
        return "reward" in self.info.roles

    @property
    def is_ref(self) -> bool:
        return "ref" in self.info.roles

    @property
    def is_rollout(self) -> bool:
        return "rollout" in self.info.roles

    @property
    def is_trainer(self) -> bool:
        return self.info.is_trainer

    @property
    def engine_index(self) -> int:
        return self.info.engine

    @property
    def engine_tp_rank(self) -> int:
        return self.info.engine_tp_rank

    @property
    def world_rank(self) -> int:
        return self.info.world_rank

    @property
    def train_group(self):
        """This trainer's default world (its DeepSpeed world); None on rollout-only ranks."""
        return self.groups["world"] if self.is_trainer else None

    @property
    def rollout_group(self):
        """This rank's vLLM engine world (colocated: the shared default world)."""
        return self.groups["world"] if self.is_rollout else None

    @property
    def dp_group(self):
        return self.groups.get("dp")

    @property
    def tp_group(self):
        return self.groups.get("tp")

    @property
    def sp_group(self):
        return self.groups.get("sp")

    @property
    def sync_group(self):
        """Standalone weight-sync group (actor world rank 0 = group rank 0, then the rollout
        ranks); None when colocated or not a member."""
        return self.groups.get("sync")

    @property
    def job_group(self):
        """Every rank of the job (gloo): trajectories and control."""
        return self.groups["job"]

    def group_rank(self, name: str) -> int:
        return self.group_ranks[name].index(self.rank)

    # --- collectives that name their group when they fail ----------------------------------
    @contextmanager
    def named(self, name: str, op: str = "collective"):
        """Re-raise a failure inside the block as CollectiveError naming rank, group, timeout."""
        try:
            yield
        except Exception as e:  # gloo: RuntimeError/DistBackendError with a bare socket message
            if any(m in str(e) for m in PEER_FAILURE_MESSAGES):
                # A peer died. Let its own error reach torchrun first, so the job's "root cause"
                # names the rank that failed, not the first of its victims to notice.
                time.sleep(float(os.environ.get("HPC_RLHF_PEER_FAILURE_GRACE_S", "3")))
            raise CollectiveError(
                f"rank {self.rank} ({'+'.join(self.roles)}, world {self.info.world!r}): {op} on "
                f"group {name!r} (global ranks {list(self.group_ranks.get(name, ()))}) failed "
                f"(timeout {self.timeout.total_seconds():.0f}s = topology.timeout_s): {e}"
            ) from e

    def all_reduce(self, tensor: torch.Tensor, name: str = "world") -> torch.Tensor:
        """Sum `tensor` over group `name` (placed on the group's device for the collective)."""
        with self.named(name, "all_reduce"):
            return collectives.all_reduce(tensor, "sum", self.groups[name])

    def broadcast(self, tensor: torch.Tensor, root: int = 0, name: str = "sync") -> torch.Tensor:
        """Broadcast from group-local rank `root` of group `name` (on the group's device)."""
        pg = self.groups[name]
        with self.named(name, "broadcast"):
            t = tensor.to(collectives.device_of(pg))
            if collectives.is_standalone(pg):
                pg.broadcast(t, root).wait()
            else:
                dist.broadcast(t, group=pg, group_src=root)
            if t is not tensor:
                tensor.copy_(t)
        return tensor

    def barrier(self, name: str = "job") -> None:
        with self.named(name, "barrier"):
            collectives.barrier(self.groups[name])

    def device(self, name: str) -> torch.device:
        """Where tensors of group `name` must live (CUDA for NCCL, CPU for gloo)."""
        return collectives.device_of(self.groups[name])

    def destroy(self) -> None:
        """Drop every group; the default world last. Safe to call twice."""
        for name in [n for n in self.groups if n not in ("world", "job", "dp", "tp", "sp")]:
            pg = self.groups.pop(name)
            if hasattr(pg, "shutdown"):
                try:
                    pg.shutdown()
                except Exception:  # a half-dead peer must not stop the teardown
                    pass
        self.groups.clear()
        if dist.is_initialized():
            try:
                dist.destroy_process_group()
            except (ValueError, RuntimeError) as e:
                # vLLM's engine shutdown (external_launcher) may already have torn the default
                # group down; nothing is left to destroy then.
                if "None" not in str(e) and "Invalid process group" not in str(e):
                    raise
