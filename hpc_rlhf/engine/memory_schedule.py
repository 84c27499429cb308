"""The colocated memory schedule: vLLM and DeepSpeed take turns on every GPU.

The RL loop moves between three states; nothing else sleeps, wakes, offloads or reloads in
colocated mode:

    to_rollout()   DeepSpeed states offloaded, then vLLM fully awake (weights + KV cache)
    to_train()     vLLM asleep (level 1: weights to host, KV cache dropped), DeepSpeed
                   states reloaded: experience (reference/critic forwards), training,
                   checkpoints and the final export run here
    sync(weights)  from training: vLLM wakes its weights and loads the trainer's gathered
                   weights; the KV cache stays asleep until the next to_rollout()

DeepSpeed is offloaded after the weight sync, not before it as DESIGN.md section 4 first drew
it: ZeRO-3 gathers the weights from the engine's own on-device partitions, so offloading first
would gather from host memory. The sync (and a checkpoint right after it) holds DeepSpeed's
states and vLLM's weights at once, never the KV cache, which wakes last.

On CUDA with `rollout.enable_sleep` these are vLLM sleep mode and DeepSpeed `offload_states`
(hpc_rlhf.engine.offload). On a CPU the same calls run as bookkeeping (nothing needs to move),
so the order and the accounting are what the CPU tests check. Each phase's peak memory is a
metric: `torch.cuda.max_memory_allocated` on CUDA (reset per phase), the process RSS on a CPU.
"""
from __future__ import annotations

import os
from typing import Iterable

import torch

from hpc_rlhf.engine.offload import OffloadReport, offload_train_states, reload_train_states

GIB = 1024 ** 3


def _rss_bytes() -> int:
    with open(f"/proc/{os.getpid()}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class ColocatedMemory:
    """Time-shares memory between one rollout engine and the DeepSpeed engines of a rank.

    engine: the rollout engine (sleep / wake(tags) / load_weights).
    trainers: the DeepSpeed engines whose states move (actor, critic).
    enabled: rollout.enable_sleep; False keeps DeepSpeed resident (the accounting still runs).
    Starts as after construction: vLLM awake, DeepSpeed resident.
    """

    def __init__(self, engine, trainers: Iterable, *, enabled: bool):
        self.engine, self.trainers, self.enabled = engine, list(trainers), enabled
        self.cuda = torch.cuda.is_available()
        self.vllm = "awake"            # awake | weights (KV cache asleep) | asleep
        self._reports: list[OffloadReport] | None = None   # None: DeepSpeed resident
        self.peaks: dict[str, float] = {}
        self.offloaded_gib = self.offload_drop_gib = 0.0
        self.log: list[str] = []       # the transitions, in order (tests read it)
        self.phase = ""
        self._start("rollout")

    # ---- accounting ---------------------------------------------------------------------
    def _start(self, phase: str) -> None:
        if self.phase:
            used = torch.cuda.max_memory_allocated() if self.cuda else _rss_bytes()
            self.peaks[self.phase] = max(self.peaks.get(self.phase, 0.0), used / GIB)
        self.phase = phase
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()

    def metrics(self) -> dict:
        """memory/<phase>_peak_gib since the last call; the bytes the last offload counted
        (offloaded_gib) and the drop of allocated CUDA memory it caused (offload_drop_gib)."""
        self._start(self.phase)
        out = {f"memory/{p}_peak_gib": v for p, v in self.peaks.items()}
        out["memory/offloaded_gib"] = self.offloaded_gib
        out["memory/offload_drop_gib"] = self.offload_drop_gib
        self.peaks = {}
        return out

    # ---- the schedule -------------------------------------------------------------------
    def to_rollout(self) -> None:
        if self._reports is None and self.enabled:
            before = torch.cuda.memory_allocated() if self.cuda else 0
            self._reports = [offload_train_states(e) for e in self.trainers]
            self.offloaded_gib = sum(r.total_bytes for r in self._reports) / GIB
            # what left the GPU (0 on a CPU: the states already live on the host)
            if self.cuda:
                self.offload_drop_gib = (before - torch.cuda.memory_allocated()) / GIB
            self.log.append("offload")
        if self.vllm != "awake":
            self.engine.wake(("weights", "kv_cache") if self.vllm == "asleep" else ("kv_cache",))
            self.log.append(f"wake:{'all' if self.vllm == 'asleep' else 'kv_cache'}")
            self.vllm = "awake"
        self._start("rollout")

    def to_train(self) -> None:
        if self.vllm == "awake":
            self.engine.sleep()
            self.log.append("sleep")
            self.vllm = "asleep"
        # vllm == "weights" (right after a sync): the weights stay, as during the sync itself
        if self._reports is not None:
            for engine, report in zip(self.trainers, self._reports):
                reload_train_states(engine, report)
            self._reports = None
            self.log.append("reload")
        if self.phase != "sync":
            self._start("train")

    def sync(self, weights) -> None:
        """Load `weights` (an iterator of (name, tensor), consumed here: ZeRO-3 gathers as it
        goes) into the engine with DeepSpeed resident and only vLLM's weights awake."""
        self.to_train()
        self._start("sync")
        if self.vllm == "asleep":
            self.engine.wake(("weights",))
            self.log.append("wake:weights")
            self.vllm = "weights"
        self.engine.load_weights(weights)
        self.log.append("load")
