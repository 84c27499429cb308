"""Which tokens of a packed sequence each rank of a ring holds.

A packed batch is one long row: samples concatenated, with boundaries `cu_seqlens`
(`[0, len0, len0+len1, ..., total]`). The row is padded at the end to a length that splits
evenly, then cut into chunks:

- contiguous: `world` chunks, rank r holds chunk r (positions [r*L/W, (r+1)*L/W)).
- balanced ("zigzag"): `2*world` chunks, rank r holds chunks r and 2*world-1-r, so every rank
  gets the same amount of causal attention work.

Everything here is pure index arithmetic on CPU tensors; the ring kernels and the data helpers
derive masks, RoPE positions and local slices from it.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class RingLayout:
    """Token placement of one packed row over a ring of `world` ranks."""

    cu_seqlens: tuple[int, ...]  # global sample boundaries, [0, ..., total]
    world: int  # ranks in the ring (ring_attn_size)
    balanced: bool = False  # zigzag placement (equal causal work per rank)

    def __post_init__(self):
        cu = tuple(int(c) for c in self.cu_seqlens)
        object.__setattr__(self, "cu_seqlens", cu)
        if len(cu) < 2 or cu[0] != 0:
            raise ValueError(
                f"cu_seqlens={list(cu)[:8]} must start at 0 and hold at least one sample; "
                "pass the cumulative sample lengths, e.g. [0, 5, 12]"
            )
        if any(b <= a for a, b in zip(cu, cu[1:])):
            raise ValueError(
                f"cu_seqlens={list(cu)} must be strictly increasing (no empty samples); "
                "drop empty samples before packing"
            )
        if self.world < 1:
            raise ValueError(f"world={self.world} must be >= 1 (the ring size)")

    @classmethod
    def from_cu_seqlens(cls, cu_seqlens, world: int, balanced: bool = False) -> "RingLayout":
        if isinstance(cu_seqlens, torch.Tensor):
            cu_seqlens = cu_seqlens.tolist()
        return cls(tuple(int(c) for c in cu_seqlens), world, balanced)

    @property
    def total(self) -> int:
        """Real (unpadded) tokens in the packed row."""
        return self.cu_seqlens[-1]

    @property
    def num_samples(self) -> int:
        return len(self.cu_seqlens) - 1

    @property
    def num_chunks(self) -> int:
        return 2 * self.world if self.balanced else self.world

    @property
    def padded_len(self) -> int:
        c = self.num_chunks
        return -(-self.total // c) * c

    @property
    def local_len(self) -> int:
        """Tokens on every rank (equal on all ranks, padding included)."""
        return self.padded_len // self.world

    @property
    def padded_cu_seqlens(self) -> tuple[int, ...]:
        """cu_seqlens with the tail padding as one extra sample (what flash varlen kernels want)."""
        if self.padded_len == self.total:
            return self.cu_seqlens
        return self.cu_seqlens + (self.padded_len,)

    def chunks_of(self, rank: int) -> tuple[int, ...]:
        self._check_rank(rank)
        if self.balanced:
            return (rank, 2 * self.world - 1 - rank)
        return (rank,)

    def token_index(self, rank: int) -> torch.Tensor:
        """Global positions (into the padded row) of rank's tokens, in local order. [local_len]"""
        size = self.padded_len // self.num_chunks
        return torch.cat([torch.arange(c * size, (c + 1) * size) for c in self.chunks_of(rank)])

    def segment_ids(self, rank: int) -> torch.Tensor:
        """Sample index of each of rank's tokens; tail padding is sample `num_samples`. [local_len]"""
        ends = torch.tensor(self.cu_seqlens[1:], dtype=torch.long)
        return torch.searchsorted(ends, self.token_index(rank), right=True)

    def position_ids(self, rank: int) -> torch.Tensor:
        """Position of each token inside its own sample (what RoPE needs). [local_len]"""
        starts = torch.tensor(self.cu_seqlens, dtype=torch.long)  # padding starts at total
        return self.token_index(rank) - starts[self.segment_ids(rank)]

    def shard(self, x: torch.Tensor, rank: int, dim: int = -1, pad_value=0) -> torch.Tensor:
        """Rank's slice of a global per-token tensor whose `dim` has `total` entries."""
        dim = dim % x.dim()
        if x.shape[dim] != self.total:
            raise ValueError(
                f"tensor dim {dim} has {x.shape[dim]} tokens but cu_seqlens total={self.total}; "
                "shard the packed row the layout was built from"
            )
        pad = self.padded_len - self.total
        if pad:
            shape = list(x.shape)
            shape[dim] = pad
            x = torch.cat([x, x.new_full(shape, pad_value)], dim=dim)
        return x.index_select(dim, self.token_index(rank).to(x.device))

    def unshard(self, x_by_rank: torch.Tensor, dim: int = -1) -> torch.Tensor:
        """Inverse of `shard`: `dim` holds every rank's slice in rank order -> global order, no padding."""
        dim = dim % x_by_rank.dim()
        order = torch.cat([self.token_index(r) for r in range(self.world)])
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(order.numel())
        return x_by_rank.index_select(dim, inverse[: self.total].to(x_by_rank.device))

    def _check_rank(self, rank: int) -> None:
        if not 0 <= rank < self.world:
            raise ValueError(f"rank={rank} must be in [0, {self.world}) for this ring layout")
