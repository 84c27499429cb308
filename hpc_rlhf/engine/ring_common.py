"""RingAttention sequence parallelism for every trainer (`train.ring_attn_size > 1`).

Ranks of a trainer world have coordinates r = (dp * ring + sp) * autotp + tp (see
hpc_rlhf/topology/layout.py). The `ring` ranks that share (dp, tp) form one ring: they read the
*same* micro-batch, pack it into one row ([1, total], sample boundaries `cu_seqlens`), and each
runs the model on its slice of that row (hpc_rlhf.ring_attn); the per-token results (logprobs,
values, scores) are gathered back, so every ring rank computes the same loss as ring size 1.
Data-parallel ranks (world / (autotp * ring) of them) read different micro-batches.

Gradient contract: each ring rank holds only its slice's share of every parameter gradient;
the true gradient of a ring is the SUM over its ranks. DeepSpeed knows nothing about rings and
AVERAGES gradients over all its data-parallel ranks (dp x ring), which gives sum/ring per ring.
So trainers backpropagate `loss * ring` (`Ring.scale_for_backward`) and log the unscaled loss;
grad_accum comes from the true data-parallel size (make_strategy(ring=True), config.sizes).

Where the ring group comes from:
- launched through hpc_rlhf.launch (a Topology): `topo.sp_group`, coordinates from `topo.info`;
- called with topo=None (the RL step, tests, scripts on a plain default world):
  `new_ring_group(ring, autotp)`, which builds every ring group of the default world with the
  same rank layout as the topology. It is collective: every rank must call it, in the same order.

Used by sft.py (ring_sft.py), dpo.py, rm.py, kto.py and, for RL, ring_rl.py.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist

from hpc_rlhf.data import TokenBatch, segment_sum
from hpc_rlhf.engine.logprobs import logprobs_from_logits
from hpc_rlhf.ring_attn import RingAttnConfig, enable_ring_attention, ring_forward


@dataclass(frozen=True)
class Ring:
    """This rank's ring: its group and which data it reads."""
    cfg: RingAttnConfig  # cfg.size ranks per ring
    group: object  # torch.distributed group of this rank's ring (cfg.size members)
    dp_rank: int  # which shard of each step's batch this ring reads
    dp_size: int  # number of rings (data-parallel replicas) in the world

    def scale_for_backward(self, loss: torch.Tensor) -> torch.Tensor:
        """loss * ring size: undo DeepSpeed's averaging over the ring ranks (module docstring)."""
        return loss * self.cfg.size


def scaled(loss: torch.Tensor, ring: Ring | None) -> torch.Tensor:
    """The loss to backpropagate: `loss`, times the ring size under a ring."""
    return ring.scale_for_backward(loss) if ring is not None else loss


def data_coords(ring: Ring | None, strategy) -> tuple[int, int]:
    """(dp_rank, dp_size) for the sampler: a ring's ranks all read the same micro-batches."""
    return (ring.dp_rank, ring.dp_size) if ring is not None else (strategy.dp_rank,
                                                                  strategy.dp_size)


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
    """This rank's ring group on the default world, for callers without a Topology. Collective:
    creates every ring group (dist.new_group is collective over the default world) and returns
    the one holding this rank."""
    rank, world = dist.get_rank(), dist.get_world_size()
    mine = None
    for members in ring_group_ranks(world, ring, autotp):
        group = dist.new_group(list(members))
        if rank in members:
            mine = group
    return mine


def ring_setup(train_cfg, topo=None) -> Ring | None:
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
        return Ring(cfg, topo.sp_group, topo.info.dp_rank, topo.layout.dp_size)
    if not dist.is_initialized():
        raise RuntimeError(f"train.ring_attn_size={size} needs a process group of at least "
                           f"{size} ranks; launch with torchrun (or hpc_rlhf.launch)")
    dp_rank, dp_size = ring_dp_coords(dist.get_rank(), dist.get_world_size(), size,
                                      train_cfg.autotp_size)
    return Ring(cfg, new_ring_group(size, train_cfg.autotp_size), dp_rank, dp_size)


def enable_ring(model):
    """Switch the HF model inside `model` (a DeepSpeed engine, a models.heads.ValueModel
    wrapper, a peft model or a plain HF model) to attention "ring". Idempotent; returns model."""
    module = getattr(model, "module", model)
    for sub in module.modules():  # the outermost HF PreTrainedModel switches all its layers
        if hasattr(sub, "set_attn_implementation"):
            if getattr(sub.config, "_attn_implementation", None) != "ring":
                enable_ring_attention(sub)
            return model
    raise TypeError(f"{type(module).__name__} holds no Hugging Face model to switch to ring "
                    "attention (expected a transformers PreTrainedModel inside it)")


# ---- one packed row per micro-batch ---------------------------------------------------------
def batch_kwargs(packing: bool, ring: Ring | None) -> dict:
    """collate options: under a ring, every sample of the micro-batch in ONE packed row."""
    return dict(packing=True, row_capacity=sys.maxsize) if ring is not None else dict(
        packing=packing)


def row_cu_seqlens(batch: TokenBatch) -> list[int]:
    """Sample boundaries [0, ..., total] of a one-row packed batch (batch_kwargs under a ring)."""
    seg = batch.segment_ids
    if seg.shape[0] != 1 or bool((seg < 0).any()):
        raise ValueError(f"ring attention needs the micro-batch packed into one row without "
                         f"padding, got segment_ids of shape {tuple(seg.shape)}; build it with "
                         "batch_kwargs(packing, ring)")
    counts = torch.bincount(seg[0].cpu(), minlength=batch.num_samples)
    return [0] + counts.cumsum(0).tolist()


def row_next_labels(input_ids: torch.Tensor, cu_seqlens) -> torch.Tensor:
    """labels[p] = input_ids[p + 1] inside a sample, -100 at each sample's last token. [1, T]"""
    ids = input_ids.reshape(1, -1)
    labels = torch.full_like(ids, -100)
    labels[:, :-1] = ids[:, 1:]
    ends = torch.tensor(cu_seqlens[1:], device=ids.device) - 1
    labels[0, ends] = -100
    return labels


def ring_token_logprobs_batch(model, batch: TokenBatch, ring: Ring,
                              temperature: float = 1.0) -> torch.Tensor:
    """forward_token_logprobs (engine.logprobs) of a one-row batch, under a ring: [1, T] float32
    log p(token t | its sample's prefix) at column t (0 at sample starts)."""
    cu = row_cu_seqlens(batch)
    labels = row_next_labels(batch.input_ids, cu)

    def per_token(out, shard):  # [1, L_local]: logp of the next token (0 where none)
        local = shard.layout.shard(labels[0], shard.rank, pad_value=-100)[None]
        lp = logprobs_from_logits(out.logits, local.clamp_min(0), temperature)
        return lp * (local != -100)

    lp_next = ring_forward(model, batch.input_ids, cu, ring.group, ring.cfg, per_token,
                           use_cache=False)  # [1, T]: logp of token t + 1 at t
    return torch.nn.functional.pad(lp_next[:, :-1], (1, 0))


def sequence_logps_any(model, batch: TokenBatch, ring: Ring | None) -> torch.Tensor:
    """Sum of target-token logprobs of each sample, [num_samples], with or without a ring."""
    if ring is None:
        from hpc_rlhf.engine.logprobs import sequence_logps
        return sequence_logps(model, batch)
    lp = ring_token_logprobs_batch(model, batch, ring)
    return segment_sum(lp * batch.loss_mask, batch.segment_ids, batch.num_samples)


def ring_token_outputs(model, batch: TokenBatch, ring: Ring, **model_kwargs) -> torch.Tensor:
    """A model that returns one value per token ([1, L] tensor, e.g. models.heads.ValueModel) on a
    one-row batch under a ring: [1, T], gathered."""
    return ring_forward(model, batch.input_ids, row_cu_seqlens(batch), ring.group, ring.cfg,
                        lambda out, shard: out, **model_kwargs)
