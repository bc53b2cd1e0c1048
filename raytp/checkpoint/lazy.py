"""Full tensors that are never materialized: a rank reads only the rows or columns of
its own shard, from whichever checkpoint tensors hold them.

A :class:`LazyTensor` is a full (logical) tensor put together along one dim from
pieces: a Hugging Face tensor (maybe transposed, as GPT-2's Conv1D weights), several
of them fused (Q, K and V; gate and up), the local tensors of the ranks of a saved
run (resharding), or zero rows (a vocabulary padded to a multiple of tp).
:func:`read_local` reads this rank's part of it under the parameter's
:class:`~raytp.placement.Layout` (its DTensor's, or its ParamSpec), slice by slice.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from raytp.checkpoint.files import CheckpointError, SafetensorsFiles
from raytp.placement import Layout, Shard

Reader = Callable[[int, int], torch.Tensor]  # (start, stop) along the dim -> that part


@dataclass(frozen=True)
class Piece:
    """``length`` entries along the dim of a :class:`LazyTensor`, read by ``read``."""

    length: int
    other_shape: tuple[int, ...]  # the shape without the dim, for validation
    read: Reader
    name: str


def file_piece(files: SafetensorsFiles, name: str, dim: int, *, transposed: bool = False,
               start: int = 0, length: int | None = None) -> Piece:
    """Entries ``[start, start + length)`` along ``dim`` of tensor ``name`` (of its transpose,
    a 2-D tensor stored (in, out), when ``transposed``)."""
    sl = files.slice(name)
    shape = tuple(sl.get_shape())
    if transposed and len(shape) != 2:
        raise CheckpointError(f"{name}: only 2-D tensors can be read transposed, got shape {shape}")
    logical = shape[::-1] if transposed else shape
    file_dim = len(shape) - 1 - dim if transposed else dim
    length = logical[dim] - start if length is None else length

    def read(lo: int, hi: int) -> torch.Tensor:
        index = [slice(None)] * len(shape)
        index[file_dim] = slice(start + lo, start + hi)
        part = sl[tuple(index)]
        return part.T if transposed else part

    other = logical[:dim] + logical[dim + 1:]
    return Piece(length, other, read, name)


class LazyTensor:
    """A full tensor of ``shape`` made of ``pieces`` along ``dim``; entries past the
    pieces are zeros (a padded vocabulary)."""

    def __init__(self, shape: tuple[int, ...], dim: int, pieces: list[Piece], dtype: torch.dtype):
        self.shape, self.dim, self.pieces, self.dtype = tuple(shape), dim, pieces, dtype
        other = self.shape[:dim] + self.shape[dim + 1:]
        for piece in pieces:
            if piece.other_shape != other:
                raise CheckpointError(f"{piece.name}: shape {piece.other_shape} off dim {dim} does "
                                      f"not fit a parameter of shape {self.shape}")
        total = sum(p.length for p in pieces)
        if total > self.shape[dim]:
            names = ", ".join(p.name for p in pieces)
            raise CheckpointError(f"{names}: {total} entries along dim {dim}; the parameter has "
                                  f"{self.shape[dim]} (shape {self.shape})")

    def read(self, start: int, stop: int) -> torch.Tensor:
        """Entries ``[start, stop)`` along the dim, read from the pieces they overlap."""
        parts, position = [], 0
        for piece in self.pieces:
            lo, hi = max(start, position), min(stop, position + piece.length)
            if lo < hi:
                parts.append(piece.read(lo - position, hi - position))
            position += piece.length
        if stop > max(start, position):
            shape = list(self.shape)
            shape[self.dim] = stop - max(start, position)
            parts.append(torch.zeros(shape, dtype=parts[0].dtype if parts else self.dtype))
        return parts[0] if len(parts) == 1 else torch.cat(parts, self.dim)


def read_local(full: LazyTensor, layout: Layout | None, tp_rank: int) -> torch.Tensor:
    """Rank ``tp_rank``'s part of ``full`` under ``layout`` (all of it when replicated, or
    when ``layout`` is None): only the ranges the rank holds are read."""
    if layout is not None and tuple(layout.global_shape) != full.shape:
        raise CheckpointError(f"the checkpoint's tensor has shape {full.shape}; the parameter's "
                              f"global shape is {tuple(layout.global_shape)}")
    if layout is None or not isinstance(layout.placement, Shard):
        return full.read(0, full.shape[full.dim])
    if layout.placement.dim != full.dim:
        raise CheckpointError(f"a tensor assembled along dim {full.dim} cannot be read for a "
                              f"parameter sharded on dim {layout.placement.dim}")
    parts = [full.read(start, stop) for start, stop in layout.local_ranges(tp_rank)]
    return parts[0] if len(parts) == 1 else torch.cat(parts, full.dim)


def shard_dim(layout: Layout | None) -> int:
    """The dim a parameter is sharded on (0 for a replicated one: any dim would do)."""
    return layout.placement.dim if layout is not None and isinstance(layout.placement, Shard) else 0
