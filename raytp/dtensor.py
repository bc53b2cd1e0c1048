"""``DTensor``: a local shard plus the global shape, its placement and the mesh.

Layers compute on local tensors; a ``DTensor`` carries the metadata needed to
build, gather, re-shard and save them, and converts to and from
``torch.distributed.tensor.DTensor`` for interop. It lives on the mesh's TP group
and is replicated across DP. Sizes the TP group does not divide are a
``ValueError``: raytp never shards unevenly.
"""

from __future__ import annotations

import torch

from raytp.comm import ops
from raytp.comm.functional import check_divisible
from raytp.mesh import DeviceMesh
from raytp.placement import (
    Partial,
    Placement,
    Replicate,
    Shard,
    as_placement,
    from_torch_placement,
    to_torch_placement,
)

_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.int32,
           torch.int8, torch.uint8, torch.bool]
_MAX_NDIM = 8


class DTensor:
    """This rank's ``local`` part of a tensor of ``global_shape`` laid out by ``placement``."""

    def __init__(self, local: torch.Tensor, mesh: DeviceMesh, placement: Placement,
                 global_shape: torch.Size):
        self.local = local
        self.mesh = mesh
        self.global_shape = torch.Size(global_shape)
        self.placement = normalize(as_placement(placement), len(self.global_shape))
        expected = local_shape(self.global_shape, self.placement, mesh.tp_size)
        if tuple(local.shape) != expected:
            raise ValueError(f"local shape {tuple(local.shape)} does not match global shape "
                             f"{tuple(self.global_shape)} under {self.placement} at "
                             f"tp={mesh.tp_size} (expected {expected})")

    @property
    def placements(self) -> tuple[Placement]:
        return (self.placement,)

    @property
    def shape(self) -> torch.Size:
        return self.global_shape

    @property
    def dtype(self) -> torch.dtype:
        return self.local.dtype

    @classmethod
    def from_local(cls, local: torch.Tensor, mesh: DeviceMesh, placements,
                   global_shape=None) -> DTensor:
        """Wrap this rank's part. Without ``global_shape``, shards are taken to be equal."""
        placement = as_placement(placements)
        if global_shape is None:
            global_shape = list(local.shape)
            if isinstance(placement, Shard):
                global_shape[placement.dim] *= mesh.tp_size
        return cls(local, mesh, placement, torch.Size(global_shape))

    @classmethod
    def from_full(cls, full: torch.Tensor | None, mesh: DeviceMesh, placements,
                  src: int = 0) -> DTensor:
        """Distribute ``full``, which lives on TP rank ``src`` only (other ranks pass ``None``).

        Shard: scattered, so each rank receives only its chunk. Replicate: broadcast.
        Partial: rank ``src`` holds the value and the others zeros.
        """
        comm = mesh.tp_comm
        placement = as_placement(placements)
        if comm.rank == src:
            if full is None:
                raise ValueError(f"from_full: the source rank {src} must pass the full tensor")
            full = full.to(mesh.device)
        shape, dtype = _broadcast_meta(full, comm, src, mesh.device)
        local = torch.empty(local_shape(shape, placement, comm.size), dtype=dtype, device=mesh.device)
        if isinstance(placement, Shard):
            chunks = list(full.chunk(comm.size, placement.dim)) if comm.rank == src else None
            comm.scatter(local, chunks, src) if comm.size > 1 else local.copy_(full)
        elif isinstance(placement, Replicate):
            if comm.rank == src:
                local.copy_(full)
            if comm.size > 1:
                comm.broadcast(local, src)
        else:
            local.copy_(full) if comm.rank == src else local.zero_()
        return cls(local, mesh, placement, shape)

    def full(self) -> torch.Tensor:
        """The whole tensor on every rank (all-gather or all-reduce as the placement needs)."""
        return self.redistribute(Replicate()).local

    def redistribute(self, placements) -> DTensor:
        """Re-lay the tensor out; differentiable through ``local``.

        Partial->Replicate: all-reduce. Partial->Shard: reduce-scatter.
        Shard->Replicate: all-gather. Replicate->Shard: local slice.
        Shard(i)->Shard(j): all-to-all.
        """
        src, dst = self.placement, normalize(as_placement(placements), len(self.global_shape))
        comm = self.mesh.tp_comm
        if src == dst:
            return self
        if isinstance(dst, Shard):
            check_divisible(self.global_shape[dst.dim], comm.size, f"size of dim {dst.dim}")
        if isinstance(src, Partial) and isinstance(dst, Replicate):
            local = ops.reduce_from(self.local, comm)
        elif isinstance(src, Partial) and isinstance(dst, Shard):
            local = ops.reduce_scatter_seq(self.local, comm, dst.dim)
        elif isinstance(src, Shard) and isinstance(dst, Replicate):
            local = ops.gather_from(self.local, comm, src.dim)
        elif isinstance(src, Replicate) and isinstance(dst, Shard):
            local = ops.scatter_to(self.local, comm, dst.dim)
        elif isinstance(src, Shard) and isinstance(dst, Shard):
            local = ops.all_to_all(self.local, comm, split_dim=dst.dim, cat_dim=src.dim)
        else:
            raise ValueError(f"redistribute from {src} to {dst} is not supported")
        return DTensor(local, self.mesh, dst, self.global_shape)

    def to_torch(self):
        """This tensor as a ``torch.distributed.tensor.DTensor`` on the TP group."""
        from torch.distributed.tensor import DTensor as TorchDTensor

        return TorchDTensor.from_local(
            self.local, self.mesh.torch_mesh(), [to_torch_placement(self.placement)],
            run_check=False, shape=self.global_shape, stride=_contiguous_strides(self.global_shape),
        )

    @classmethod
    def from_torch(cls, tensor, mesh: DeviceMesh) -> DTensor:
        """Wrap a 1-D-mesh ``torch.distributed.tensor.DTensor`` living on ``mesh``'s TP group."""
        if len(tensor.placements) != 1:
            raise ValueError(f"only 1-D torch DTensors convert; got placements {tensor.placements}")
        return cls(tensor.to_local(), mesh, from_torch_placement(tensor.placements[0]), tensor.shape)

    def __repr__(self):
        return (f"DTensor(global_shape={tuple(self.global_shape)}, placement={self.placement}, "
                f"local_shape={tuple(self.local.shape)}, tp_rank={self.mesh.tp_rank})")


def normalize(placement: Placement, ndim: int) -> Placement:
    """``placement`` with a negative shard dim counted from the front (``Shard(-1)`` of a
    3-d tensor is ``Shard(2)``), so that equal layouts compare equal."""
    if not isinstance(placement, Shard):
        return placement
    if not -ndim <= placement.dim < ndim:
        raise ValueError(f"{placement} is out of range for a {ndim}-d tensor")
    return Shard(placement.dim % ndim)


def local_shape(global_shape, placement: Placement, tp_size: int) -> tuple[int, ...]:
    shape = list(global_shape)
    placement = normalize(placement, len(shape))
    if isinstance(placement, Shard):
        dim = placement.dim
        shape[dim] = check_divisible(shape[dim], tp_size, f"size of dim {dim}")
    return tuple(shape)


def _contiguous_strides(shape) -> tuple[int, ...]:
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= size
    return tuple(reversed(strides))


def _broadcast_meta(full, comm, src, device) -> tuple[torch.Size, torch.dtype]:
    """Shape and dtype of ``full`` from rank ``src`` to every rank of ``comm``."""
    meta = torch.full((_MAX_NDIM + 2,), -1, dtype=torch.int64, device=device)
    # an unsupported tensor is sent as ndim -1, so every rank raises instead of waiting
    if comm.rank == src and full.dim() <= _MAX_NDIM and full.dtype in _DTYPES:
        meta[0], meta[1] = full.dim(), _DTYPES.index(full.dtype)
        meta[2:2 + full.dim()] = torch.tensor(full.shape)
    if comm.size > 1:
        comm.broadcast(meta, src)
    if meta[0] < 0:
        raise ValueError(f"from_full supports tensors of up to {_MAX_NDIM} dims with dtypes "
                         f"{[str(d) for d in _DTYPES]}")
    ndim, dtype = int(meta[0]), _DTYPES[int(meta[1])]
    return torch.Size(meta[2:2 + ndim].tolist()), dtype
