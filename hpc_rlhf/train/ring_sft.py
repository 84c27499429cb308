"""SFT with RingAttention sequence parallelism (`train.ring_attn_size > 1`).

Ranks of a trainer world have coordinates r = (dp * ring + sp) * autotp + tp (see
hpc_rlhf/topology/layout.py). The `ring` ranks that share (dp, tp) form one ring: they read the
*same* micro-batch, pack it into one row ([1, total], sample boundaries `cu_seqlens`), and each
runs the model on its slice of that row (hpc_rlhf.ring_attn); `ring_token_logprobs` gathers the
per-token logprobs back, so every ring rank computes the same loss. Data-parallel ranks
(world / (autotp * ring) of them) read different micro-batches.

Gradient contract: each ring rank holds only its slice's share of every parameter gradient;
the true gradient of a ring is the SUM over its ranks. DeepSpeed knows nothing about rings and
AVERAGES gradients over all its data-parallel ranks (dp x ring), which gives sum/ring per ring.
So the trainer backpropagates `loss * ring` (`RingSFT.scale_for_backward`), and logs the
unscaled loss. grad_accum is derived from the true data-parallel size (make_strategy(ring=True)).

Where the ring group comes from:
- launched through hpc_rlhf.launch (a Topology): `topo.sp_group`, coordinates from `topo.info`;
- recipes called with topo=None (tests, scripts on a plain default world):
  `new_ring_group(ring, autotp)`, which builds every ring group of the default world with the
  same rank layout as the topology. It is collective: every rank must call it, in the same order.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from hpc_rlhf.data import TokenBatch, sft_batch
from hpc_rlhf.ring_attn import RingAttnConfig, ring_token_logprobs
from hpc_rlhf.train.losses_sft import sft_loss


@dataclass(frozen=True)
class RingSFT:
    """This rank's ring: its group and which data it reads."""
    cfg: RingAttnConfig  # cfg.size ranks per ring
    group: object  # torch.distributed group of this rank's ring (cfg.size members)
    dp_rank: int  # which shard of each step's batch this ring reads
    dp_size: int  # number of rings (data-parallel replicas) in the world

    def scale_for_backward(self, loss: torch.Tensor) -> torch.Tensor:
        """loss * ring size: undo DeepSpeed's averaging over the ring ranks (module docstring)."""
        return loss * self.cfg.size


# ---- rank arithmetic (pure) ---------------------------------------------------------------
def ring_group_ranks(world: int, ring: int, autotp: int = 1) -> tuple[tuple[int, ...], ...]:
    """Every ring group of a trainer world, as world-local ranks, ordered by (dp, tp) like
    Layout.subgroups(world, "sp"): rank = (dp * ring + sp) * autotp + tp."""
    if ring < 1 or autotp < 1 or world % (ring * autotp):
        raise ValueError(f"train.ring_attn_size={ring} x train.autotp_size={autotp} must divide "
                         f"the {world} training ranks; change one of them")
    return tuple(tuple((dp * ring + sp) * autotp + tp for sp in range(ring))
                 for dp in range(world // (ring * autotp)) for tp in range(autotp))


def ring_dp_coords(rank: int, world: int, ring: int, autotp: int = 1) -> tuple[int, int]:
    """(dp_rank, dp_size) of world-local `rank`: the rings are the data-parallel replicas."""
    ring_group_ranks(world, ring, autotp)  # validates the sizes
    return rank // (ring * autotp), world // (ring * autotp)


def new_ring_group(ring: int, autotp: int = 1):
    """This rank's ring group on the default world, for callers without a Topology (tests,
    plain scripts). Collective: creates every ring group (dist.new_group is collective over
    the default world) and returns the one holding this rank."""
    rank, world = dist.get_rank(), dist.get_world_size()
    mine = None
    for members in ring_group_ranks(world, ring, autotp):
        group = dist.new_group(list(members))
        if rank in members:
            mine = group
    return mine


def ring_sft_setup(train_cfg, topo=None) -> RingSFT | None:
    """The ring for `train.ring_attn_size` (None when it is 1): from the topology when there is
    one, else built on the default world with `new_ring_group`."""
    size = train_cfg.ring_attn_size
    if size == 1:
        return None
    cfg = RingAttnConfig(size=size)
    if topo is not None:
        if topo.layout.sp_size != size or topo.sp_group is None:
            raise ValueError(f"train.ring_attn_size={size} but the topology built ring groups "
                             f"of {topo.layout.sp_size} ranks; build the Topology from this config")
        return RingSFT(cfg, topo.sp_group, topo.info.dp_rank, topo.layout.dp_size)
    if not dist.is_initialized():
        raise RuntimeError(f"train.ring_attn_size={size} needs a process group of at least "
                           f"{size} ranks; launch with torchrun (or hpc_rlhf.launch)")
    dp_rank, dp_size = ring_dp_coords(dist.get_rank(), dist.get_world_size(), size,
                                      train_cfg.autotp_size)
    return RingSFT(cfg, new_ring_group(size, train_cfg.autotp_size), dp_rank, dp_size)


# ---- one micro-batch ----------------------------------------------------------------------
def one_row_batch(samples, pad_id: int) -> tuple[TokenBatch, list[int]]:
    """All samples of a micro-batch packed back to back in one row, and its cu_seqlens."""
    lengths = [len(s.input_ids) for s in samples]
    batch = sft_batch(samples, pad_id=pad_id, packing=True, row_capacity=sum(lengths))
    cu = [0]
    for n in lengths:
        cu.append(cu[-1] + n)
    return batch, cu  # batch tensors [1, total]


def next_token_labels(batch: TokenBatch) -> torch.Tensor:
    """labels[t] = input_ids[t + 1] where token t + 1 is a target, else -100. [1, total]"""
    ids, mask = batch.input_ids, batch.loss_mask  # [1, T]
    labels = torch.full_like(ids, -100)
    labels[:, :-1] = torch.where(mask[:, 1:] > 0, ids[:, 1:], -100)
    return labels


def ring_sft_loss(model, samples, *, pad_id: int, ring: RingSFT, device) -> torch.Tensor:
    """Unscaled SFT loss of one micro-batch (equal on every rank of the ring)."""
    batch, cu = one_row_batch(samples, pad_id)
    batch = batch.to(device)
    lp = ring_token_logprobs(model, batch.input_ids, next_token_labels(batch), cu, ring.group,
                             ring.cfg)  # [1, T]: logp of token t + 1 at t
    # TokenBatch convention: the logprob of target token t sits at t (column 0 is never a target)
    token_lp = torch.nn.functional.pad(lp[:, :-1], (1, 0))  # [1, T]
    return sft_loss(token_lp, batch.loss_mask)
