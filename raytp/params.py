"""How each parameter of a TP module is laid out, and what its gradient needs.

A TP layer attaches a :class:`ParamSpec` to each of its parameters. The spec says
which part of the full parameter each rank holds (its :class:`~raytp.placement.Layout`,
through which :func:`raytp.dtensor.of` views the parameter as a ``DTensor``), over which group
the gradient must be summed before the optimizer step (``grad_reduce``), and how
many ranks of the TP group hold each element (for the global gradient norm).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch

from raytp.comm.backend import Communicator
from raytp.placement import Layout, Replicate, Shard

_ATTR = "_raytp_spec"


@dataclass(frozen=True)
class ParamSpec(Layout):
    """Layout of one parameter over the TP group (a :class:`~raytp.placement.Layout`:
    placement, global shape, blocks), and what its gradient needs.

    ``grad_reduce``, when set, means: each rank's gradient is a partial sum, to be
    summed over the ranks that hold the same element. For a ``Replicate()``
    parameter that is the whole group ``grad_reduce``; for a sharded one it is the
    ranks sharing each replicated block (then ``grad_reduce`` must be the TP group).
    :func:`raytp.dtensor.of` views a parameter with its spec as a ``DTensor``.
    """

    grad_reduce: Communicator | None = None

    def __post_init__(self):
        super().__post_init__()
        if (isinstance(self.placement, Shard) and self.grad_reduce is not None
                and self.grad_reduce.size != self.tp_size):
            raise ValueError(f"a sharded parameter's grad_reduce must be its TP group of "
                             f"{self.tp_size} ranks, not {self.grad_reduce!r}")

    def _replicated_parts(self, local: torch.Tensor, tp_rank: int):
        """``(local part, size, chunk index)`` of each replicated block, in order."""
        dim = self.placement.dim
        parts = local.split([size for size, _ in self.local_blocks()], dim)
        return [(part, size, tp_rank * n // self.tp_size)
                for part, (size, n) in zip(parts, self.blocks, strict=True) if n < self.tp_size]

    def reduce_buffer(self, local: torch.Tensor, tp_rank: int) -> torch.Tensor:
        """``local`` laid out for the TP all-reduce that completes replicated blocks.

        Each replicated block's local chunk goes at its chunk index in zeros of the
        block's full size; blocks held by one rank are left out. Summed over the TP
        group, chunk ``k`` of the buffer is the sum over the ranks holding chunk ``k``.
        Shape: ``local``'s, with the shard dim the sum of the replicated blocks' sizes.
        """
        dim, buffers = self.placement.dim, []
        for part, size, index in self._replicated_parts(local, tp_rank):
            shape = list(part.shape)
            shape[dim] = size
            buffer = part.new_zeros(shape)
            buffer.narrow(dim, index * part.shape[dim], part.shape[dim]).copy_(part)
            buffers.append(buffer)
        return torch.cat(buffers, dim)

    @torch.no_grad()
    def read_reduce_buffer_(self, buffer: torch.Tensor, local: torch.Tensor, tp_rank: int) -> None:
        """Copy this rank's chunks of a summed :meth:`reduce_buffer` back into ``local``."""
        dim, start = self.placement.dim, 0
        for part, size, index in self._replicated_parts(local, tp_rank):
            chunk = part.shape[dim]
            part.copy_(buffer.narrow(dim, start + index * chunk, chunk))
            start += size


def set_spec(param: torch.Tensor, spec: ParamSpec) -> torch.Tensor:
    setattr(param, _ATTR, spec)
    return param


def get_spec(param: torch.Tensor) -> ParamSpec | None:
    """The spec a TP layer attached, or ``None`` for a plain replicated parameter."""
    return getattr(param, _ATTR, None)


def weighted_parts(tensor: torch.Tensor, spec: ParamSpec | None,
                   tp_size: int) -> list[tuple[torch.Tensor, int]]:
    """``(part, replicas)`` pairs that cover a local parameter or gradient: each part is
    held by ``replicas`` TP ranks, so weighting its squares by 1 / replicas counts every
    element once over the TP group. A parameter with no spec is taken to be replicated."""
    x = tensor.detach()
    if spec is None or isinstance(spec.placement, Replicate):
        return [(x, tp_size)]
    blocks = spec.local_blocks()
    parts = x.split([size for size, _ in blocks], spec.placement.dim)
    return [(part, replicas) for part, (_, replicas) in zip(parts, blocks, strict=True)]


def sumsq_once(tensor: torch.Tensor, spec: ParamSpec | None, tp_size: int) -> torch.Tensor:
    """Sum of squares of a local parameter or gradient, each element counted once over
    the TP group (:func:`weighted_parts`). Accumulated in float32, or float64 for a
    float64 tensor."""
    total = None
    for part, replicas in weighted_parts(tensor, spec, tp_size):
        x = part if part.dtype == torch.float64 else part.float()
        total = x.pow(2).sum() / replicas if total is None else total + x.pow(2).sum() / replicas
    return total


def materialize_(module: torch.nn.Module, device: torch.device | str) -> torch.nn.Module:
    """Give the meta parameters of ``module`` uninitialized storage on ``device``,
    keeping their specs (``Module.to_empty`` may replace parameters and drop them)
    and keeping a parameter shared by several submodules (tied weights) shared."""
    done: dict[int, tuple[torch.Tensor, torch.nn.Parameter]] = {}  # keeps the old one alive: ids stay unique
    for sub in module.modules():
        for name, param in list(sub.named_parameters(recurse=False)):
            if param.device.type != "meta":
                continue
            if id(param) not in done:
                new = torch.nn.Parameter(torch.empty_like(param, device=device),
                                         requires_grad=param.requires_grad)
                spec = get_spec(param)
                done[id(param)] = (param, set_spec(new, spec) if spec else new)
            sub.register_parameter(name, done[id(param)][1])
    return module


@torch.no_grad()
def reset_parameters_(module: torch.nn.Module) -> torch.nn.Module:
    """Initialize every parameter of ``module``: call ``reset_parameters()`` of each
    submodule that holds parameters of its own, in module order (the order of the RNG
    draws, so a seed gives one model). A TP layer draws its full tensors and keeps this
    rank's slice, so with torch's RNG seeded alike on every rank, tp=N holds tp=1's
    weights. Raises a ValueError naming a submodule that holds parameters but has no
    ``reset_parameters``: they would keep uninitialized memory. A module that holds
    parameters of its own must not call this on itself from its ``reset_parameters``."""
    for name, sub in module.named_modules():
        own = [n for n, _ in sub.named_parameters(recurse=False)]
        if not own:
            continue
        reset = getattr(sub, "reset_parameters", None)
        if not callable(reset):
            raise ValueError(f"{name or 'the module'} ({type(sub).__name__}) holds parameters {own} "
                             "but has no reset_parameters() to initialize them")
        reset()
    return module


def grad_reduce_groups(params: Iterable[torch.Tensor]) -> dict[Communicator, list[torch.Tensor]]:
    """Trainable parameters whose gradients are partial sums, by the group that completes
    them. A rank may have no gradient where another has one (only TP rank 0 adds the
    bias of a partial output), so every rank lists them all."""
    groups: dict[Communicator, list[torch.Tensor]] = {}
    for p in params:
        spec = get_spec(p)
        if spec is not None and spec.grad_reduce is not None and p.requires_grad:
            groups.setdefault(spec.grad_reduce, []).append(p)
    return groups
