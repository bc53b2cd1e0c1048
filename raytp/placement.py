"""How a tensor is laid out over the ranks of a TP group: a placement (``Shard(dim)``,
``Replicate()``, ``Partial()``) and the :class:`Layout` that adds the global shape and
the blocks of a fused sharded tensor."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from raytp.comm.functional import check_divisible


class Placement:
    """Base of :class:`Shard`, :class:`Replicate` and :class:`Partial`."""


@dataclass(frozen=True)
class Shard(Placement):
    """Each rank holds one equal chunk of the tensor along ``dim``."""

    dim: int


@dataclass(frozen=True)
class Replicate(Placement):
    """Each rank holds the whole tensor."""


@dataclass(frozen=True)
class Partial(Placement):
    """Each rank holds a partial sum; the tensor is the sum over the ranks."""


def as_placement(p) -> Placement:
    """Accept a placement, or a one-element sequence holding one."""
    if isinstance(p, (list, tuple)):
        if len(p) != 1:
            raise ValueError(f"a DTensor lives on the TP group: give one placement, not {p!r}")
        p = p[0]
    if not isinstance(p, Placement) or type(p) is Placement:
        raise TypeError(f"{p!r} is not a placement: use Shard(dim), Replicate() or Partial()")
    return p


def normalize(placement: Placement, ndim: int) -> Placement:
    """``placement`` with a negative shard dim counted from the front (``Shard(-1)`` of a
    3-d tensor is ``Shard(2)``), so that equal layouts compare equal."""
    if not isinstance(placement, Shard):
        return placement
    if not -ndim <= placement.dim < ndim:
        raise ValueError(f"{placement} is out of range for a {ndim}-d tensor")
    return Shard(placement.dim % ndim)


@dataclass(frozen=True)
class Layout:
    """Which part of a tensor of ``global_shape`` each rank of a TP group of ``tp_size`` holds.

    ``Replicate()`` and ``Partial()``: every rank holds the whole shape. ``Shard(dim)``:
    the tensor is a concatenation along ``dim`` of ``blocks``, each ``(size, n_shards)``;
    a block is cut into ``n_shards`` equal chunks and TP rank ``r`` holds chunk
    ``r * n_shards // tp_size`` of each block, concatenated in block order. Without
    ``blocks`` it is one block sharded ``tp_size`` ways: a plain even shard. Several
    blocks describe fused weights (Q, K and V; gate and up), which a plain ``Shard(dim)``
    cannot: each rank holds a slice of every block. ``n_shards < tp_size`` replicates a
    block over ``tp_size // n_shards`` ranks (key/value heads when ``n_kv_heads < tp``).
    """

    placement: Placement
    global_shape: torch.Size
    tp_size: int
    blocks: tuple[tuple[int, int], ...] = ()

    def __post_init__(self):
        if not isinstance(self.tp_size, int) or self.tp_size < 1:
            raise ValueError(f"tp_size={self.tp_size!r} must be a positive integer")
        object.__setattr__(self, "global_shape", torch.Size(self.global_shape))
        object.__setattr__(self, "placement", normalize(as_placement(self.placement), len(self.global_shape)))
        blocks = tuple((int(size), int(n)) for size, n in self.blocks)
        if not isinstance(self.placement, Shard):
            if blocks:
                raise ValueError(f"blocks {blocks} need a Shard placement, not {self.placement}")
            return
        dim = self.placement.dim
        if not blocks:
            check_divisible(self.global_shape[dim], self.tp_size, f"size of dim {dim}")
            blocks = ((self.global_shape[dim], self.tp_size),)
        for size, n_shards in blocks:
            if n_shards < 1 or self.tp_size % n_shards:
                raise ValueError(f"a block sharded {n_shards} ways cannot map onto tp={self.tp_size}")
            check_divisible(size, n_shards, "block size")
        if sum(size for size, _ in blocks) != self.global_shape[dim]:
            raise ValueError(f"blocks {blocks} add up to {sum(size for size, _ in blocks)}, not to "
                             f"dim {dim} of the global shape {tuple(self.global_shape)}")
        object.__setattr__(self, "blocks", blocks)

    @property
    def plain(self) -> bool:
        """Whether the placement alone says it all: replicated, partial, or an even shard
        (one block sharded ``tp_size`` ways, or any blocks at ``tp_size=1``), which is
        what the same placement means in ``torch.distributed.tensor``."""
        if not isinstance(self.placement, Shard) or self.tp_size == 1:
            return True
        return self.blocks == ((self.global_shape[self.placement.dim], self.tp_size),)

    def local_blocks(self) -> list[tuple[int, int]]:
        """``(local_size, replicas)`` of each block along the shard dim, in order."""
        return [(size // n, self.tp_size // n) for size, n in self.blocks]

    def local_shape(self) -> tuple[int, ...]:
        """The shape of each rank's local tensor."""
        shape = list(self.global_shape)
        if isinstance(self.placement, Shard):
            shape[self.placement.dim] = sum(size for size, _ in self.local_blocks())
        return tuple(shape)

    def has_replicated_blocks(self) -> bool:
        """Whether some block of this sharded tensor is held by more than one rank."""
        return isinstance(self.placement, Shard) and any(n < self.tp_size for _, n in self.blocks)

    def local_ranges(self, tp_rank: int) -> list[tuple[int, int]]:
        """``(start, stop)`` along the shard dim of the full tensor of each part that
        ``tp_rank`` holds, in the order of its local tensor (one per block)."""
        ranges, start = [], 0
        for size, n_shards in self.blocks:
            chunk = size // n_shards
            index = tp_rank * n_shards // self.tp_size
            ranges.append((start + index * chunk, start + (index + 1) * chunk))
            start += size
        return ranges

    def full_parts(self) -> list[tuple[int, int, int]]:
        """Where each part of the full tensor lies in the local tensors of the tp ranks:
        ``(tp_rank, local_start, length)`` along the shard dim, in the order of the full
        tensor. A chunk held by several ranks is taken from the first of them."""
        parts, local_start = [], 0
        for (_, n_shards), (local_size, replicas) in zip(self.blocks, self.local_blocks(), strict=True):
            parts += [(k * replicas, local_start, local_size) for k in range(n_shards)]
            local_start += local_size
        return parts

    def shard(self, full: torch.Tensor, tp_rank: int) -> torch.Tensor:
        """Rank ``tp_rank``'s part of the full tensor (a contiguous copy; all of it unless sharded)."""
        if not isinstance(self.placement, Shard):
            return full.detach().clone()
        dim = self.placement.dim
        parts = [full.narrow(dim, start, stop - start) for start, stop in self.local_ranges(tp_rank)]
        return torch.cat(parts, dim).contiguous()

    def assemble(self, local_tensors: list[torch.Tensor]) -> torch.Tensor:
        """The full tensor from every tp rank's local tensor (the inverse of :meth:`shard`;
        rank 0's tensor when replicated)."""
        if not isinstance(self.placement, Shard):
            return local_tensors[0]
        dim = self.placement.dim
        return torch.cat([local_tensors[rank].narrow(dim, start, length)
                          for rank, start, length in self.full_parts()], dim)


def to_torch_placement(p: Placement):
    from torch.distributed.tensor import Partial as TPartial
    from torch.distributed.tensor import Replicate as TReplicate
    from torch.distributed.tensor import Shard as TShard

    if isinstance(p, Shard):
        return TShard(p.dim)
    return TReplicate() if isinstance(p, Replicate) else TPartial()


def from_torch_placement(p) -> Placement:
    if p.is_shard():
        return Shard(p.dim)
    if p.is_replicate():
        return Replicate()
    if p.is_partial() and getattr(p, "reduce_op", "sum") == "sum":
        return Partial()
    raise ValueError(f"torch placement {p!r} has no raytp equivalent")
