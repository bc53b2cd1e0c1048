"""Gradient synchronization, the global gradient norm, and optimizer specs.

The order of a training step on every rank is::

    loss.backward()
    raytp.sync_grads(model, mesh)            # partial grads over TP, mean over DP
    raytp.clip_grad_norm_(model.parameters(), 1.0, mesh)
    optimizer.step()
"""

from __future__ import annotations

import collections
from collections.abc import Iterable
from dataclasses import asdict, dataclass

import torch
from torch import nn

from raytp.comm.backend import Communicator
from raytp.mesh import DeviceMesh
from raytp.optim_groups import check_no_decay, grouped, param_groups  # noqa: F401
from raytp.params import get_spec, grad_reduce_groups, weighted_parts
from raytp.placement import Shard


def _params(params) -> list[torch.Tensor]:
    if isinstance(params, nn.Module):
        return list(params.parameters())
    if isinstance(params, torch.Tensor):
        return [params]
    return list(params)


@torch.no_grad()
def _all_reduce_coalesced(tensors: list[torch.Tensor], comm: Communicator, scale: float = 1.0):
    """Sum ``tensors`` over ``comm`` in place, one collective per dtype."""
    if not tensors:
        return
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for t in tensors:
        by_dtype.setdefault(t.dtype, []).append(t)
    for group in by_dtype.values():
        flat = torch.cat([t.reshape(-1) for t in group])
        comm.all_reduce(flat)
        if scale != 1.0:
            flat.mul_(scale)
        for t, part in zip(group, flat.split([t.numel() for t in group]), strict=True):
            t.copy_(part.view_as(t))


@torch.no_grad()
def _reduce_partial_grads(params: list[torch.Tensor], comm: Communicator) -> None:
    """Sum each gradient over the ranks of ``comm`` holding the same elements: the whole
    gradient of a replicated parameter; the replicated blocks of a sharded one, through
    a buffer of each block's full size (see ``ParamSpec.reduce_buffer``), so no
    sub-group is needed. One all-reduce per dtype for all of them."""
    tensors, buffered = [], []
    for p in params:
        spec = get_spec(p)
        if not isinstance(spec.placement, Shard):
            tensors.append(p.grad)
        elif spec.has_replicated_blocks():
            buffered.append((p, spec.reduce_buffer(p.grad, comm.rank)))
            tensors.append(buffered[-1][1])
    _all_reduce_coalesced(tensors, comm)
    for p, buffer in buffered:
        get_spec(p).read_reduce_buffer_(buffer, p.grad, comm.rank)


def sync_grads(params: nn.Module | Iterable[torch.Tensor], mesh: DeviceMesh) -> None:
    """Make every gradient whole before the optimizer step.

    1. Gradients that are partial sums over the TP group (replicated parameters used
       through a slice, key/value heads shared by several ranks, norms and
       row-parallel biases under sequence parallelism) are summed over the ranks
       holding the same elements, as their spec's ``grad_reduce`` says.
    2. With dp > 1, every gradient is averaged over the DP group.

    Collectives: one all-reduce per group and dtype. Every rank must call it.
    """
    params = _params(params)
    for comm, group in grad_reduce_groups(params).items():
        for p in group:
            if p.grad is None:  # this rank did not use it; its share of the sum is zero
                p.grad = torch.zeros_like(p)
        if comm.size > 1:
            _reduce_partial_grads(group, comm)
    if mesh.dp_size > 1:
        grads = [p.grad for p in params if p.grad is not None]
        _all_reduce_coalesced(grads, mesh.dp_comm, scale=1.0 / mesh.dp_size)


@torch.no_grad()
def grad_norm(params: nn.Module | Iterable[torch.Tensor], mesh: DeviceMesh) -> torch.Tensor:
    """The 2-norm of all gradients of the full model, the same on every rank.

    Sharded gradients add their squares over the TP group; replicated ones count
    once. Accumulated in float32, or in float64 when some gradient is float64 (so
    that float64 parity runs clip identically at every tp).
    Collectives: one all-reduce over the TP group.
    """
    params = [p for p in _params(params) if p.grad is not None]
    wide = any(p.grad.dtype == torch.float64 for p in params)
    acc = torch.float64 if wide else torch.float32
    groups = collections.defaultdict(list)  # (replicas, dtype) -> parts: one foreach kernel each
    for p in params:
        for part, replicas in weighted_parts(p.grad, get_spec(p), mesh.tp_size):
            groups[replicas, part.dtype].append(part)
    total = torch.zeros((), dtype=acc, device=mesh.device)
    for (replicas, _), parts in groups.items():
        norms = torch._foreach_norm(parts, 2, dtype=acc)  # no float32 copy of a bf16 gradient
        total += torch.stack(norms).to(total.device).square().sum() / replicas
    if mesh.tp_size > 1:
        mesh.tp_comm.all_reduce(total)
    return total.sqrt()


@torch.no_grad()
def poison_grads_if_nonfinite_(params: nn.Module | Iterable[torch.Tensor], loss: torch.Tensor) -> None:
    """Make one gradient element NaN when ``loss`` is NaN or infinite (it adds ``loss * 0``:
    no host sync). Call it before :func:`sync_grads`: the global gradient norm, reduced over
    TP and DP, is then not finite on every rank whose group saw such a loss, or whose DP
    peers did, so all ranks skip (or stop at) the step together."""
    grad = next((p.grad for p in _params(params) if p.grad is not None and p.grad.numel()), None)
    if grad is not None:
        grad[(0,) * grad.dim()].add_(loss.detach().to(grad.device, grad.dtype) * 0)


@torch.no_grad()
def clip_grad_norm_(params: nn.Module | Iterable[torch.Tensor], max_norm: float,
                    mesh: DeviceMesh) -> torch.Tensor:
    """Scale the gradients so that their global norm is at most ``max_norm``; return
    the norm before clipping (as ``torch.nn.utils.clip_grad_norm_`` does on one device)."""
    if max_norm <= 0:
        raise ValueError(f"max_norm={max_norm} must be positive")
    params = [p for p in _params(params) if p.grad is not None]
    norm = grad_norm(params, mesh)
    coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
    grads = collections.defaultdict(list)
    for p in params:
        grads[p.grad.device, p.grad.dtype].append(p.grad)
    for (device, dtype), group in grads.items():
        torch._foreach_mul_(group, coef.to(device, dtype))
    return norm


@dataclass(frozen=True)
class SGD:
    """Picklable spec of ``torch.optim.SGD``, built on each rank over its local shards;
    ``no_decay`` says which parameters get no weight decay (see :func:`param_groups`)."""

    lr: float = 1e-2
    momentum: float = 0.0
    weight_decay: float = 0.0
    nesterov: bool = False
    no_decay: str | tuple[str, ...] = "default"
    shard_over_dp: bool = False  # ZeRO-1: see raytp.zero

    def __post_init__(self):
        _check_hparams(self)
        check_no_decay(self.no_decay)

    def build(self, params, mesh: DeviceMesh | None = None) -> torch.optim.Optimizer:
        """The optimizer over ``params`` (a module, its ``named_parameters()``, or plain
        parameters), grouped as :func:`grouped` says; DP-sharded over ``mesh`` with
        ``shard_over_dp`` (:mod:`raytp.zero`)."""
        return _make(self, grouped(params, self.weight_decay, self.no_decay), mesh)


@dataclass(frozen=True)
class AdamW:
    """Picklable spec of ``torch.optim.AdamW``, built on each rank over its local shards;
    ``no_decay`` says which parameters get no weight decay (see :func:`param_groups`)."""

    lr: float = 3e-4
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.01
    no_decay: str | tuple[str, ...] = "default"
    fused: bool | None = None  # torch's fused CUDA kernel (None: torch's default)
    shard_over_dp: bool = False  # ZeRO-1: state and update of 1/dp of the shard per DP rank (raytp.zero)

    def __post_init__(self):
        _check_hparams(self)
        check_no_decay(self.no_decay)
        if not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"betas={self.betas} must each be in [0, 1)")

    def build(self, params, mesh: DeviceMesh | None = None) -> torch.optim.Optimizer:
        """The optimizer over ``params`` (a module, its ``named_parameters()``, or plain
        parameters), grouped as :func:`grouped` says; DP-sharded over ``mesh`` with
        ``shard_over_dp`` (:mod:`raytp.zero`)."""
        return _make(self, grouped(params, self.weight_decay, self.no_decay), mesh)


def torch_optimizer(spec: SGD | AdamW) -> tuple[type[torch.optim.Optimizer], dict]:
    """The torch optimizer class of a raytp spec and its keyword arguments."""
    inner = torch.optim.AdamW if isinstance(spec, AdamW) else torch.optim.SGD
    return inner, {k: v for k, v in asdict(spec).items() if k not in ("no_decay", "shard_over_dp")}


def _make(spec, groups: list, mesh) -> torch.optim.Optimizer:
    inner, hypers = torch_optimizer(spec)
    if spec.shard_over_dp:
        from raytp.zero import build_sharded

        return build_sharded(inner, groups, hypers, mesh)
    return inner(groups, **hypers)


def _check_hparams(spec) -> None:
    if not isinstance(spec.shard_over_dp, bool):
        raise ValueError(f"{type(spec).__name__}: shard_over_dp={spec.shard_over_dp!r} must be True or False")
    for name in ("lr", "weight_decay", "momentum", "eps"):
        value = getattr(spec, name, 0.0)
        if not value >= 0.0:  # also catches NaN
            raise ValueError(f"{type(spec).__name__}: {name}={value} must be >= 0")


def build_optimizer(spec, module: nn.Module, masters=None, mesh: DeviceMesh | None = None
                    ) -> torch.optim.Optimizer:
    """``spec``'s optimizer over ``module``'s local shards, or over their master copies
    (``masters``, a :class:`raytp.precision.MasterWeights`) under mixed precision. raytp's
    specs (:class:`SGD`, :class:`AdamW`) group the parameters by the modules holding them
    (:func:`param_groups`), the masters as their parameters; any other spec gets the
    plain parameters (or masters). ``mesh`` is for a DP-sharded optimizer (``shard_over_dp``)."""
    if not isinstance(spec, (SGD, AdamW)):
        return spec.build(masters.masters if masters is not None else module.parameters())
    if masters is None:
        return spec.build(module, mesh=mesh)
    master_of = dict(zip(map(id, masters.params), masters.masters, strict=True))
    groups = param_groups(module, spec.weight_decay, spec.no_decay)
    return spec.build([{**g, "params": [master_of[id(p)] for p in g["params"]]} for g in groups], mesh=mesh)
