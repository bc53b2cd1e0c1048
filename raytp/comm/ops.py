"""Autograd-aware region ops, named as in the Megatron-LM paper.

Each is one small ``torch.autograd.Function`` and a snake_case wrapper. The first
line of each docstring says the forward collective, then the backward one. All of
them return their input unchanged (a no-op) when the group has one rank. Under
``torch.compile`` each collective is a graph break (:func:`_eager`): it runs eager
through its communicator and is counted (:mod:`raytp.compile`).
"""

from __future__ import annotations

import torch

from raytp.comm import functional as F
from raytp.comm.backend import Communicator
from raytp.comm.counter import backward_tag, current_tag


@torch.compiler.disable
def _eager(function: type[torch.autograd.Function], *args):
    """``function.apply(*args)`` outside ``torch.compile``: a compiled region breaks its graph
    here, and the collective (forward and backward) runs through raytp's communicator."""
    return function.apply(*args)


class _CopyTo(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, comm):
        ctx.comm, ctx.tag = comm, current_tag()
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        with backward_tag(ctx):
            return F.all_reduce(grad, ctx.comm), None


class _ReduceFrom(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, comm):
        return F.all_reduce(x, comm)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _ScatterTo(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, comm, dim):
        ctx.comm, ctx.dim, ctx.tag = comm, dim, current_tag()
        return F.local_chunk(x, comm, dim)

    @staticmethod
    def backward(ctx, grad):
        with backward_tag(ctx):
            return F.all_gather(grad, ctx.comm, ctx.dim), None, None


class _GatherFrom(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, comm, dim):
        ctx.comm, ctx.dim = comm, dim
        return F.all_gather(x, comm, dim)

    @staticmethod
    def backward(ctx, grad):
        return F.local_chunk(grad, ctx.comm, ctx.dim), None, None


class _AllGatherSeq(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, comm, dim):
        ctx.comm, ctx.dim, ctx.tag = comm, dim, current_tag()
        return F.all_gather(x, comm, dim)

    @staticmethod
    def backward(ctx, grad):
        with backward_tag(ctx):
            return F.reduce_scatter(grad, ctx.comm, ctx.dim), None, None


class _ReduceScatterSeq(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, comm, dim):
        ctx.comm, ctx.dim, ctx.tag = comm, dim, current_tag()
        return F.reduce_scatter(x, comm, dim)

    @staticmethod
    def backward(ctx, grad):
        with backward_tag(ctx):
            return F.all_gather(grad, ctx.comm, ctx.dim), None, None


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, comm, split_dim, cat_dim):
        ctx.comm, ctx.split_dim, ctx.cat_dim, ctx.tag = comm, split_dim, cat_dim, current_tag()
        return F.all_to_all(x, comm, split_dim, cat_dim)

    @staticmethod
    def backward(ctx, grad):
        with backward_tag(ctx):
            return F.all_to_all(grad, ctx.comm, ctx.cat_dim, ctx.split_dim), None, None, None


def copy_to(x: torch.Tensor, comm: Communicator) -> torch.Tensor:
    """Forward: identity. Backward: all-reduce of the gradient (the paper's *f*).

    Enters a tensor-parallel region whose input is replicated."""
    return x if comm.size == 1 else _eager(_CopyTo, x, comm)


def reduce_from(x: torch.Tensor, comm: Communicator) -> torch.Tensor:
    """Forward: all-reduce. Backward: identity (the paper's *g*).

    Leaves a tensor-parallel region whose output is a partial sum on each rank."""
    return x if comm.size == 1 else _eager(_ReduceFrom, x, comm)


def scatter_to(x: torch.Tensor, comm: Communicator, dim: int = -1) -> torch.Tensor:
    """Forward: keep this rank's chunk along ``dim``. Backward: all-gather along ``dim``."""
    return x if comm.size == 1 else _eager(_ScatterTo, x, comm, dim)


def gather_from(x: torch.Tensor, comm: Communicator, dim: int = -1) -> torch.Tensor:
    """Forward: all-gather along ``dim``. Backward: keep this rank's chunk of the gradient."""
    return x if comm.size == 1 else _eager(_GatherFrom, x, comm, dim)


def all_gather_seq(x: torch.Tensor, comm: Communicator, dim: int = 1) -> torch.Tensor:
    """Forward: all-gather along the sequence ``dim``. Backward: reduce-scatter along it.

    Leaves a sequence-parallel region for a tensor-parallel one."""
    return x if comm.size == 1 else _eager(_AllGatherSeq, x, comm, dim)


def reduce_scatter_seq(x: torch.Tensor, comm: Communicator, dim: int = 1) -> torch.Tensor:
    """Forward: reduce-scatter along the sequence ``dim``. Backward: all-gather along it.

    Leaves a tensor-parallel region (partial sums) for a sequence-parallel one."""
    return x if comm.size == 1 else _eager(_ReduceScatterSeq, x, comm, dim)


def all_to_all(x: torch.Tensor, comm: Communicator, split_dim: int, cat_dim: int) -> torch.Tensor:
    """Forward: all-to-all, sharded on ``cat_dim`` -> sharded on ``split_dim``. Backward: the reverse."""
    return x if comm.size == 1 else _eager(_AllToAll, x, comm, split_dim, cat_dim)
