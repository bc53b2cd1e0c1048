"""How each parameter of a TP module is laid out, and what its gradient needs.

A TP layer attaches a :class:`ParamSpec` to each of its parameters. The spec says
which part of the full parameter this rank holds (``blocks``), over which group
the gradient must be summed before the optimizer step (``grad_reduce``), and how
many ranks of the TP group hold each element (for the global gradient norm).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch

from raytp.comm.backend import Communicator
from raytp.comm.functional import check_divisible
from raytp.placement import Placement, Replicate, Shard

_ATTR = "_raytp_spec"


@dataclass(frozen=True)
class ParamSpec:
    """Layout of one parameter over the TP group.

    ``placement`` is ``Shard(dim)`` or ``Replicate()``. A sharded parameter may be
    a concatenation along ``dim`` of ``blocks``, each ``(size, n_shards)``: the
    block is cut into ``n_shards`` equal chunks and TP rank ``r`` holds chunk
    ``r * n_shards // tp``, so ``n_shards < tp`` replicates the block over
    ``tp // n_shards`` ranks (key/value heads when ``n_kv_heads < tp``).
    """

    placement: Placement
    global_shape: torch.Size
    tp_size: int
    blocks: tuple[tuple[int, int], ...] = ()
    grad_reduce: Communicator | None = None

    def __post_init__(self):
        if isinstance(self.placement, Shard) and not self.blocks:
            dim = self.placement.dim
            object.__setattr__(self, "blocks", ((self.global_shape[dim], self.tp_size),))
        for size, n_shards in self.blocks:
            if self.tp_size % n_shards:
                raise ValueError(f"a block sharded {n_shards} ways cannot map onto tp={self.tp_size}")
            check_divisible(size, n_shards, "block size")

    def local_blocks(self) -> list[tuple[int, int]]:
        """``(local_size, replicas)`` of each block along the shard dim, in order."""
        return [(size // n, self.tp_size // n) for size, n in self.blocks]

    def shard(self, full: torch.Tensor, tp_rank: int) -> torch.Tensor:
        """This rank's part of the full parameter (a contiguous copy)."""
        if isinstance(self.placement, Replicate):
            return full.detach().clone()
        dim, parts, start = self.placement.dim, [], 0
        for size, n_shards in self.blocks:
            chunk = size // n_shards
            index = tp_rank * n_shards // self.tp_size
            parts.append(full.narrow(dim, start + index * chunk, chunk))
            start += size
        return torch.cat(parts, dim).contiguous()


def set_spec(param: torch.Tensor, spec: ParamSpec) -> torch.Tensor:
    setattr(param, _ATTR, spec)
    return param


def get_spec(param: torch.Tensor) -> ParamSpec | None:
    """The spec a TP layer attached, or ``None`` for a plain replicated parameter."""
    return getattr(param, _ATTR, None)


def sumsq_once(tensor: torch.Tensor, spec: ParamSpec | None, tp_size: int) -> torch.Tensor:
    """Sum of squares of a local parameter or gradient, each element weighted by
    1 / (TP ranks holding it), so that the sum over the TP group counts each element
    once. A parameter with no spec is taken to be replicated over the TP group."""
    x = tensor.detach().float()
    if spec is None or isinstance(spec.placement, Replicate):
        return x.pow(2).sum() / tp_size
    total = x.new_zeros(())
    blocks = spec.local_blocks()
    parts = x.split([size for size, _ in blocks], spec.placement.dim)
    for part, (_, replicas) in zip(parts, blocks, strict=True):
        total = total + part.pow(2).sum() / replicas
    return total


def materialize_(module: torch.nn.Module, device: torch.device | str) -> torch.nn.Module:
    """Give the meta parameters of ``module`` uninitialized storage on ``device``,
    keeping their specs (``Module.to_empty`` may replace parameters and drop them)."""
    for sub in module.modules():
        for name, param in list(sub.named_parameters(recurse=False)):
            if param.device.type == "meta":
                new = torch.nn.Parameter(torch.empty_like(param, device=device),
                                         requires_grad=param.requires_grad)
                spec = get_spec(param)
                sub.register_parameter(name, set_spec(new, spec) if spec else new)
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
