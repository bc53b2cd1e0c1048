"""Dim-aware collectives on plain tensors (no autograd).

Each returns a new tensor and leaves its input untouched. Sizes must divide
evenly by the group size; a size that does not is a ``ValueError`` naming it.
"""

from __future__ import annotations

import torch

from raytp.comm.backend import Communicator


def check_divisible(size: int, parts: int, what: str) -> int:
    """Return ``size // parts``, or raise naming ``what`` when ``parts`` does not divide it."""
    if size % parts:
        raise ValueError(f"{what}={size} is not divisible by tp={parts}")
    return size // parts


def local_chunk(tensor: torch.Tensor, comm: Communicator, dim: int) -> torch.Tensor:
    """This rank's chunk of ``tensor`` along ``dim`` (a contiguous copy)."""
    per_rank = check_divisible(tensor.shape[dim], comm.size, f"size of dim {dim}")
    return tensor.narrow(dim, comm.rank * per_rank, per_rank).contiguous()


def all_reduce(tensor: torch.Tensor, comm: Communicator) -> torch.Tensor:
    """The sum of ``tensor`` over the group, as a new tensor."""
    out = tensor.clone(memory_format=torch.contiguous_format)
    comm.all_reduce(out)
    return out


def all_reduce_max(tensor: torch.Tensor, comm: Communicator) -> torch.Tensor:
    """The element-wise maximum of ``tensor`` over the group, as a new tensor."""
    out = tensor.clone(memory_format=torch.contiguous_format)
    comm.all_reduce_max(out)
    return out


def all_gather(tensor: torch.Tensor, comm: Communicator, dim: int) -> torch.Tensor:
    """Concatenate every rank's ``tensor`` along ``dim``: (.., n, ..) -> (.., size * n, ..)."""
    dim = dim % tensor.dim()
    gathered = tensor.new_empty((comm.size * tensor.shape[0], *tensor.shape[1:]))
    comm.all_gather(gathered, tensor.contiguous())
    if dim == 0:
        return gathered
    stacked = gathered.unflatten(0, (comm.size, tensor.shape[0]))  # (size, *tensor.shape)
    return stacked.movedim(0, dim).flatten(dim, dim + 1)


def reduce_scatter(tensor: torch.Tensor, comm: Communicator, dim: int) -> torch.Tensor:
    """This rank's chunk along ``dim`` of the sum over the group: (.., size * n, ..) -> (.., n, ..)."""
    dim = dim % tensor.dim()
    per_rank = check_divisible(tensor.shape[dim], comm.size, f"size of dim {dim}")
    # (size, ..., n, ...): rank k's chunk becomes the k-th slab of dim 0
    chunks = tensor.unflatten(dim, (comm.size, per_rank)).movedim(dim, 0).contiguous()
    out = tensor.new_empty(chunks.shape[1:])
    comm.reduce_scatter(out, chunks.flatten(0, 1))
    return out


def all_to_all(tensor: torch.Tensor, comm: Communicator, split_dim: int, cat_dim: int) -> torch.Tensor:
    """Re-shard: split ``tensor`` along ``split_dim`` over the ranks, concatenate what arrives
    along ``cat_dim``. A tensor sharded on ``cat_dim`` comes out sharded on ``split_dim``."""
    split_dim, cat_dim = split_dim % tensor.dim(), cat_dim % tensor.dim()
    per_rank = check_divisible(tensor.shape[split_dim], comm.size, f"size of dim {split_dim}")
    chunks = tensor.unflatten(split_dim, (comm.size, per_rank)).movedim(split_dim, 0).contiguous()
    received = torch.empty_like(chunks)
    comm.all_to_all(received.flatten(0, 1), chunks.flatten(0, 1))
    return torch.cat(received.unbind(0), dim=cat_dim)
