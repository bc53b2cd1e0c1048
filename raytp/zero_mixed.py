"""Mixed precision with the optimizer sharded over DP (``precision=MixedPrecision(...)``
with ``AdamW(shard_over_dp=True)``): ZeRO-1 over master weights.

Each DP rank keeps, of its TP shard, only the master weights (``master_dtype``) and the
optimizer state of its 1/dp slice (:class:`raytp.zero.ShardedOptimizer`'s pieces, here
copies rather than views of the ``param_dtype`` parameters). A step:

1. every micro-batch's ``param_dtype`` gradients are added into full-size
   ``master_dtype`` gradient buffers, one per parameter (:class:`GradSlot`), as the
   unsharded policy adds them into its masters' gradients;
2. at the step the buffers (cast to ``reduce_dtype``) complete their TP partial sums
   and are reduce-scattered over DP, in ``reduce_dtype``; each rank's slice, cast to
   ``master_dtype``, is the gradient of its master pieces;
3. the global norm and clipping over the pieces, the optimizer steps the master pieces,
   and the pieces, cast to ``param_dtype``, are all-gathered into every parameter.

Checkpoints hold the whole master weights and state of the TP shard, as an unsharded
run's do: :meth:`ShardedMasters.view` gathers the masters over DP (a collective every
rank calls) into full tensors under the model's names; loading writes into such a view
and :meth:`ShardedMasters.to_model` takes this rank's slice back. So a checkpoint saved
at one dp loads at any other, sharded or not, mixed or not.
"""

from __future__ import annotations

import functools
import logging

import torch
from torch import nn

from raytp.mesh import DeviceMesh
from raytp.params import get_spec, set_spec
from raytp.precision import MixedPrecision
from raytp.zero import ShardedOptimizer, _Bucket, _Piece, _sync_tp_grads

log = logging.getLogger(__name__)


class GradSlot:
    """A parameter's full-size gradient buffer in ``master_dtype``, read as ``.grad`` by the
    gradient sync, scaling and poisoning, as a parameter's would be (it carries the
    parameter's spec, so TP partial sums are completed the same way)."""

    requires_grad = True

    def __init__(self, param: nn.Parameter):
        self.param, self.grad = param, None
        spec = get_spec(param)
        if spec is not None:
            set_spec(self, spec)


class _MasterBucket(_Bucket):
    """A bucket whose pieces are ``master_dtype`` copies of the owned elements."""

    def __init__(self, params: list[torch.Tensor], dp, master_dtype: torch.dtype):
        self.master_dtype = master_dtype  # before the pieces are made
        super().__init__(params, dp)

    def piece(self, param: torch.Tensor, start: int, length: int) -> _Piece:
        owned = param.detach().view(-1)[start:start + length]
        return _Piece(param, start, length, owned.to(self.master_dtype, copy=True))


class ShardedMixedOptimizer(ShardedOptimizer):
    """:class:`raytp.zero.ShardedOptimizer` over ``param_dtype`` parameters whose pieces are
    ``master_dtype`` masters; gradients accumulate in :attr:`slots` (see the module
    docstring). Build it before the model is cast: the pieces copy the full-precision
    values."""

    def __init__(self, params, inner, defaults: dict, mesh: DeviceMesh, policy: MixedPrecision):
        self.policy = policy
        self.bucket_class = functools.partial(_MasterBucket, master_dtype=policy.torch_dtype("master_dtype"))
        super().__init__(params, inner, defaults, mesh)
        self.slots = {id(p): GradSlot(p) for g in self.param_groups for p in g["params"]}

    @torch.no_grad()
    def accumulate_grads(self) -> None:
        """Add each parameter's gradient into its slot (``master_dtype``) and drop it."""
        for slot in self.slots.values():
            grad = slot.param.grad
            if grad is None:
                continue
            if slot.grad is None:
                slot.grad = grad.to(self.policy.torch_dtype("master_dtype"), copy=True)
            else:
                slot.grad.add_(grad)
            slot.param.grad = None

    def _reduce_grads(self) -> None:
        reduce_dtype = self.policy.torch_dtype("reduce_dtype")
        for slot in self.slots.values():
            if slot.grad is None and slot.param.requires_grad:  # unused here: zeros in the sums
                slot.grad = torch.zeros_like(slot.param, dtype=reduce_dtype)
            elif slot.grad is not None:
                slot.grad = slot.grad.to(reduce_dtype)
        _sync_tp_grads(list(self.slots.values()))
        for bucket in self._all_buckets():
            bucket.reduce_scatter_grads([self.slots[id(p)].grad for p in bucket.params])
        for slot in self.slots.values():
            slot.grad = None  # the pieces hold what the step needs

    def _check_storage(self) -> None:
        """Nothing to check: the pieces are copies, not views of the parameters."""

    def zero_grad(self, set_to_none: bool = True):
        super().zero_grad(set_to_none)
        for slot in self.slots.values():
            slot.grad = None

    def masters(self) -> list[torch.Tensor]:
        """This rank's master pieces (1/dp of the TP shard's masters)."""
        return [piece.view for piece in self._pieces()]

    @torch.no_grad()
    def full_masters(self) -> dict[int, nn.Parameter]:
        """``{id(param): the TP shard's whole master}``, gathered over DP (collective: one
        all-gather per bucket), each with its parameter's spec."""
        out = {}
        for bucket in self._all_buckets():
            flat = bucket.gather_state([piece.view for piece in bucket.pieces])
            for p, part in zip(bucket.params, flat.split([p.numel() for p in bucket.params]), strict=True):
                out[id(p)] = _like(p, part.view_as(p).clone())
        return out

    @torch.no_grad()
    def load_masters(self, full: dict[int, torch.Tensor]) -> None:
        """This rank's pieces, and every parameter (cast), from the whole masters ``full``."""
        for piece in self._pieces():
            source = full[id(piece.param)].reshape(-1)[piece.start:piece.start + piece.length]
            piece.view.copy_(source)
        for bucket in self._all_buckets():
            for p in bucket.params:
                p.copy_(full[id(p)])


def _like(param: torch.Tensor, value: torch.Tensor) -> nn.Parameter:
    out = nn.Parameter(value, requires_grad=param.requires_grad)
    spec = get_spec(param)
    return set_spec(out, spec) if spec is not None else out


class ShardedMasters:
    """What the rank engine holds for mixed precision with a DP-sharded optimizer, in
    place of :class:`raytp.precision.MasterWeights` (the same methods)."""

    def __init__(self, model: nn.Module, optimizer: ShardedMixedOptimizer):
        self.model, self.optimizer = model, optimizer

    @property
    def masters(self) -> list[torch.Tensor]:
        """This rank's master pieces (what ``memory_bytes`` counts as master bytes)."""
        return self.optimizer.masters()

    def grad_params(self) -> list[GradSlot]:
        """What holds the gradients until the step: the slots."""
        return list(self.optimizer.slots.values())

    def accumulate_grads(self) -> None:
        self.optimizer.accumulate_grads()

    def to_model(self, loaded: MastersView | None = None) -> None:
        """After a step: nothing (the step all-gathered the parameters). After a load into
        ``loaded`` (a :meth:`view`): this rank's pieces and the parameters from it."""
        if loaded is not None:
            self.optimizer.load_masters(loaded.tensor_of)

    def view(self) -> MastersView:
        """The whole masters under the model's names (collective over DP)."""
        return MastersView(self.model, self.optimizer.full_masters())


class MastersView:
    """The masters gathered over DP, dressed as the model for checkpoints and exports: its
    parameter names, ``config`` and dropout ``rng``; ``tensor_of`` maps each parameter
    (by id) to its master, which is how a checkpoint keys the optimizer state."""

    def __init__(self, model: nn.Module, tensor_of: dict[int, nn.Parameter]):
        self._model, self.tensor_of = model, tensor_of
        self.config = getattr(model, "config", None)
        self.rng = getattr(model, "rng", None)

    def named_parameters(self, remove_duplicate: bool = True):
        for name, p in self._model.named_parameters(remove_duplicate=remove_duplicate):
            yield name, self.tensor_of[id(p)]

    def parameters(self):
        return iter(self.tensor_of.values())


def build_sharded_mixed(spec, module: nn.Module, policy: MixedPrecision, mesh: DeviceMesh):
    """The DP-sharded optimizer of ``spec`` (a raytp spec with ``shard_over_dp``) over
    ``module``'s parameters with ``master_dtype`` master pieces, then ``module`` cast to
    ``param_dtype``; returns ``(optimizer, ShardedMasters)``. Call it on the model as built
    (full precision), before any cast."""
    from raytp.optim import param_groups, torch_optimizer

    inner, hypers = torch_optimizer(spec)
    groups = param_groups(module, spec.weight_decay, spec.no_decay)
    optimizer = ShardedMixedOptimizer(groups, inner, hypers, mesh, policy)
    module.to(dtype=policy.torch_dtype("param_dtype"))  # in place: the parameters (and specs) stay
    if mesh.rank == 0:
        log.info("mixed precision with shard_over_dp: masters and optimizer state of 1/%d of each "
                 "shard per DP rank", mesh.dp_size)
    return optimizer, ShardedMasters(module, optimizer)
