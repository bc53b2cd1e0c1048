"""``DTensor``: a local shard plus the global shape, its placement and the mesh.

Layers compute on local tensors; a ``DTensor`` carries the metadata needed to
build, gather, re-shard and save them, and converts to and from
``torch.distributed.tensor.DTensor`` for interop. It lives on the mesh's TP group
and is replicated across DP. Sizes the TP group does not divide are a
``ValueError``: raytp never shards unevenly.

Every parameter of a built model is one: :func:`of` views a parameter (its local
tensor IS the parameter) under the layout its layer recorded, a
:class:`~raytp.params.ParamSpec`, including the blocks of fused weights;
checkpoints and exports read and gather parameters through it.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterator

import torch
from torch import nn

from raytp.comm import ops
from raytp.comm.functional import check_divisible
from raytp.mesh import DeviceMesh
from raytp.params import get_spec
from raytp.placement import (
    Layout,
    Partial,
    Placement,
    Replicate,
    Shard,
    as_placement,
    from_torch_placement,
    normalize,
    to_torch_placement,
)

_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.int32,
           torch.int8, torch.uint8, torch.bool]
_MAX_NDIM = 8


class DTensor:
    """This rank's ``local`` part of a tensor of ``global_shape`` laid out by ``placement``.

    ``blocks`` (``Shard`` only; see :class:`~raytp.placement.Layout`) describes a fused
    tensor, a concatenation of blocks of which each rank holds a slice of every one
    (Q, K and V; gate and up): ``full()`` gathers it; ``redistribute`` to anything else
    and ``to_torch`` refuse it, as torch's DTensor has no such layout.
    """

    def __init__(self, local: torch.Tensor, mesh: DeviceMesh, placement: Placement,
                 global_shape: torch.Size, blocks: tuple[tuple[int, int], ...] = ()):
        self.local = local
        self.mesh = mesh
        self.layout = Layout(as_placement(placement), torch.Size(global_shape), mesh.tp_size, blocks)
        expected = self.layout.local_shape()
        if tuple(local.shape) != expected:
            raise ValueError(f"local shape {tuple(local.shape)} does not match global shape "
                             f"{tuple(self.global_shape)} under {self.placement} at "
                             f"tp={mesh.tp_size} (expected {expected})")

    @property
    def placement(self) -> Placement:
        return self.layout.placement

    @property
    def global_shape(self) -> torch.Size:
        return self.layout.global_shape

    @property
    def blocks(self) -> tuple[tuple[int, int], ...]:
        """``(size, n_shards)`` of each block along the shard dim (one block for an even shard)."""
        return self.layout.blocks

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
        """The whole tensor on every rank (all-gather or all-reduce as the placement needs;
        none when replicated, and then it is ``local`` itself)."""
        if not self.layout.plain:
            return self._gather_blocks()
        return self.redistribute(Replicate()).local

    def _gather_blocks(self) -> torch.Tensor:
        """All-gather along the shard dim, then each block's chunks put back in order."""
        dim, comm = self.placement.dim, self.mesh.tp_comm
        gathered = ops.gather_from(self.local, comm, dim)  # (.., tp * local size, ..), rank-major
        return self.layout.assemble(list(gathered.chunk(comm.size, dim)))

    def redistribute(self, placements) -> DTensor:
        """Re-lay the tensor out; differentiable through ``local``.

        Partial->Replicate: all-reduce. Partial->Shard: reduce-scatter.
        Shard->Replicate: all-gather. Replicate->Shard: local slice.
        Shard(i)->Shard(j): all-to-all. A tensor of several blocks goes only to Replicate.
        """
        src, dst = self.placement, normalize(as_placement(placements), len(self.global_shape))
        comm = self.mesh.tp_comm
        if not self.layout.plain:
            if not isinstance(dst, Replicate):
                raise ValueError(f"a DTensor of blocks {self.blocks} redistributes only to "
                                 f"Replicate(), not to {dst}")
            return DTensor(self._gather_blocks(), self.mesh, dst, self.global_shape)
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

        if not self.layout.plain:
            raise ValueError(f"torch's DTensor has no layout of blocks {self.blocks} "
                             f"sharded on dim {self.placement.dim}: gather it with full()")

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
        blocks = "" if self.layout.plain else f", blocks={self.blocks}"
        return (f"DTensor(global_shape={tuple(self.global_shape)}, placement={self.placement}{blocks}, "
                f"local_shape={tuple(self.local.shape)}, tp_rank={self.mesh.tp_rank})")


def of(param: torch.Tensor, mesh: DeviceMesh) -> DTensor:
    """``param`` as a DTensor on ``mesh``'s TP group, without a copy: its ``local`` IS
    ``param``. Placement, global shape and blocks come from the parameter's
    :class:`~raytp.params.ParamSpec`; a parameter without one is ``Replicate()``."""
    spec = get_spec(param)
    if spec is None:
        return DTensor(param, mesh, Replicate(), param.shape)
    if spec.tp_size != mesh.tp_size:
        raise ValueError(f"the parameter was laid out for tp={spec.tp_size}; the mesh has "
                         f"tp={mesh.tp_size}")
    return DTensor(param, mesh, spec.placement, spec.global_shape, spec.blocks)


def named_dtensors(model: nn.Module, mesh: DeviceMesh) -> Iterator[tuple[str, DTensor]]:
    """``(name, of(param, mesh))`` for every parameter of ``model``, in the order of
    ``model.named_parameters()`` (a tied parameter once, under its first name)."""
    for name, param in model.named_parameters():
        yield name, of(param, mesh)


def gather_parameter(model: nn.Module, name: str, mesh: DeviceMesh) -> torch.Tensor:
    """The full parameter ``name`` of ``model`` (global shape, a detached CPU copy).

    Collective over the TP group: every TP rank calls it with the same ``name``. An
    all-gather when the parameter is sharded, none when replicated. A name the model
    does not have is a ``KeyError`` naming the closest ones, raised before any collective.
    """
    params = dict(model.named_parameters(remove_duplicate=False))  # a tied weight by either name
    if name not in params:
        close = difflib.get_close_matches(name, params, n=3, cutoff=0.5) or sorted(params)[:5]
        raise KeyError(f"{type(model).__name__} has no parameter {name!r}; close names: {close}")
    with torch.no_grad():
        full = of(params[name], mesh).full()
    return full.detach().to("cpu", copy=True)


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
