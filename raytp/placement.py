"""How a tensor is laid out over the ranks of a TP group."""

from __future__ import annotations

from dataclasses import dataclass


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
