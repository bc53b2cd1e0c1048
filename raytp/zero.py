"""Optimizer-state sharding over DP (ZeRO-1).

Each param group's local (TP-shard) parameters are laid end to end in one flat index
space per dtype, padded to a multiple of dp; DP rank ``r`` owns the contiguous slice
``[r * L, (r + 1) * L)``. The optimizer (a torch ``AdamW`` or ``SGD``) steps views of
the owned pieces of the parameters, so it holds state for 1/dp of the shard only and
no copy of the weights (the parameters are the master weights).

A step (:meth:`ShardedOptimizer.sync_grads_and_norm`, then :meth:`step`):

1. TP partial sums completed, as :func:`raytp.sync_grads` does;
2. per bucket, the flat gradients reduce-scattered over DP (mean): this rank keeps its slice;
3. the global gradient norm from the slices (each element counted once over TP and DP:
   one all-reduce over TP, one over DP), and the slices clipped;
4. the optimizer steps the owned pieces; per bucket, the slices are all-gathered over DP
   into every parameter.

Checkpoints hold the unsharded state (:func:`unsharded` gathers it; :func:`load_unsharded`
takes this rank's slice), so they load at any dp, sharded or not.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from raytp.comm.backend import Communicator
from raytp.mesh import DeviceMesh
from raytp.optim import _reduce_partial_grads
from raytp.params import get_spec, grad_reduce_groups
from raytp.placement import Replicate

log = logging.getLogger(__name__)


@dataclass
class _Piece:
    param: torch.Tensor  # the model parameter (local TP shard)
    start: int  # first element of the piece within the flattened parameter
    length: int
    view: torch.Tensor  # (length,) view of the parameter's storage, what the optimizer steps


class _Bucket:
    """The parameters of one group and dtype in one flat index space, and this DP rank's
    slice of it: ``numel`` padded to ``dp * per_rank``."""

    def __init__(self, params: list[torch.Tensor], dp: Communicator):
        self.params, self.dp, self.warned = params, dp, False
        self.numel = sum(p.numel() for p in params)
        self.per_rank = -(-self.numel // dp.size)
        lo, hi = dp.rank * self.per_rank, (dp.rank + 1) * self.per_rank
        self.pieces, offset = [], 0
        for p in params:
            a, b = max(lo, offset), min(hi, offset + p.numel())
            if a < b:
                self.pieces.append(self.piece(p, a - offset, b - a))
            offset += p.numel()
        if not self.pieces:  # a bucket smaller than dp slices: an empty piece keeps the state's keys
            last = params[-1]
            self.pieces.append(self.piece(last, last.numel(), 0))
        self.pad = self.per_rank - sum(piece.length for piece in self.pieces)  # on the last ranks

    def piece(self, param: torch.Tensor, start: int, length: int) -> _Piece:
        """The owned elements ``[start, start + length)`` of ``param``: a view of its storage."""
        return _Piece(param, start, length, param.detach().view(-1)[start:start + length])

    def flat(self, tensors: list[torch.Tensor]) -> torch.Tensor:
        """(dp * per_rank,) the tensors of the bucket's parameters end to end, zero-padded."""
        parts = [t.reshape(-1) for t in tensors]
        extra = self.dp.size * self.per_rank - self.numel
        return torch.cat(parts + [parts[0].new_zeros(extra)])

    @torch.no_grad()
    def reduce_scatter_grads(self, grads: list[torch.Tensor | None] | None = None) -> None:
        """Each piece's ``.grad`` (in the piece's dtype): the DP mean of the gradients over
        the piece, reduced in their own dtype. ``grads``: one per parameter (default: their
        ``.grad``); a missing gradient counts as zeros."""
        grads = [p.grad for p in self.params] if grads is None else grads
        if any(g is None for g in grads) and not self.warned:
            self.warned = True  # torch's optimizers skip such a parameter; here it decays
            log.warning("a trainable parameter has no gradient: the DP-sharded optimizer steps it with "
                        "zeros (weight decay and momentum still apply)")
        flat = self.flat([g if g is not None else torch.zeros_like(p) for p, g in zip(self.params, grads,
                                                                                      strict=True)])
        out = flat.new_empty(self.per_rank)
        self.dp.reduce_scatter(out, flat)
        out.mul_(1.0 / self.dp.size)
        start = 0
        for piece in self.pieces:
            piece.view.grad = out[start:start + piece.length].to(piece.view.dtype)
            start += piece.length

    @torch.no_grad()
    def all_gather_params(self) -> None:
        """Every rank's updated slice into every parameter (in the parameters' dtype)."""
        dtype, pad = self.params[0].dtype, self.params[0].new_zeros(self.pad)
        local = torch.cat([piece.view.to(dtype) for piece in self.pieces] + [pad])
        full = local.new_empty(self.dp.size * self.per_rank)
        self.dp.all_gather(full, local)
        for p, part in zip(self.params, full[:self.numel].split([p.numel() for p in self.params]),
                           strict=True):
            p.view(-1).copy_(part)

    def gather_state(self, states: list[torch.Tensor]) -> torch.Tensor:
        """(numel,) a per-element state whose pieces are ``states``, gathered over DP."""
        local = torch.cat([*states, states[0].new_zeros(self.pad)])
        full = local.new_empty(self.dp.size * self.per_rank)
        self.dp.all_gather(full, local.contiguous())
        return full[:self.numel]


class ShardedOptimizer(torch.optim.Optimizer):
    """``inner`` (a torch optimizer class) over this DP rank's slice of the parameters
    (see the module docstring). ``param_groups`` are the model's (a schedule may set their
    ``lr``; it reaches the slices at the next step); ``state`` is the slices' state."""

    bucket_class = _Bucket  # how a bucket makes its pieces (raytp.zero_mixed: master copies)

    def __init__(self, params, inner: type[torch.optim.Optimizer], defaults: dict, mesh: DeviceMesh):
        super().__init__(params, defaults)
        self.mesh, self.inner_class = mesh, inner
        self.buckets = [[self.bucket_class(ps, mesh.dp_comm) for ps in _by_dtype(g["params"]) if ps]
                        for g in self.param_groups]
        self.inner = inner([{**_hypers(g), "params": [piece.view for b in buckets for piece in b.pieces]}
                            for g, buckets in zip(self.param_groups, self.buckets, strict=True)])
        self.state = self.inner.state  # what memory_bytes() counts: 1/dp of the unsharded state

    def _all_buckets(self):
        return [b for buckets in self.buckets for b in buckets]

    @torch.no_grad()
    def sync_grads_and_norm(self, max_grad_norm: float | None) -> torch.Tensor:
        """TP partial sums, the DP reduce-scatter, the global gradient norm (the same on
        every rank), and the slices clipped to ``max_grad_norm`` (None: not clipped)."""
        self._reduce_grads()
        norm = self._grad_norm()
        if max_grad_norm:
            coef = torch.clamp(max_grad_norm / (norm + 1e-6), max=1.0)
            for piece in self._pieces():
                piece.view.grad.mul_(coef.to(piece.view.dtype))
        return norm

    def _reduce_grads(self) -> None:
        """Steps 1 and 2: the TP partial sums, then the DP reduce-scatter into the pieces."""
        _sync_tp_grads([p for g in self.param_groups for p in g["params"]])
        for bucket in self._all_buckets():
            bucket.reduce_scatter_grads()

    def _pieces(self):
        return [piece for b in self._all_buckets() for piece in b.pieces]

    def _grad_norm(self) -> torch.Tensor:
        pieces = self._pieces()
        wide = any(piece.view.dtype == torch.float64 for piece in pieces)
        total = torch.zeros((), dtype=torch.float64 if wide else torch.float32, device=self.mesh.device)
        for piece in pieces:
            total += _piece_sumsq(piece, self.mesh.tp_size).to(total.device)
        if self.mesh.tp_size > 1:
            self.mesh.tp_comm.all_reduce(total)
        self.mesh.dp_comm.all_reduce(total)
        return total.sqrt()

    @torch.no_grad()
    def step(self, closure=None):
        if closure is not None:
            raise ValueError("a DP-sharded optimizer takes no closure")
        self._check_storage()
        for group, inner in zip(self.param_groups, self.inner.param_groups, strict=True):
            inner.update(_hypers(group))
        self.inner.step()
        for bucket in self._all_buckets():
            bucket.all_gather_params()

    def _check_storage(self) -> None:
        for piece in self._pieces():
            offset = piece.start * piece.param.element_size()
            if piece.length and piece.view.data_ptr() != piece.param.data_ptr() + offset:
                raise RuntimeError("a parameter's storage was replaced after the sharded optimizer was "
                                   "built; build the optimizer after casting or moving the model")

    def zero_grad(self, set_to_none: bool = True):
        super().zero_grad(set_to_none)
        for piece in self._pieces():
            piece.view.grad = None

    def state_dict(self):
        raise NotImplementedError("a DP-sharded optimizer's state is saved by raytp.checkpoint (unsharded)")

    def load_state_dict(self, state_dict):
        raise NotImplementedError("load a DP-sharded optimizer's state with raytp.checkpoint")

    # -- checkpoints ----------------------------------------------------------------------

    def unsharded(self, keys: dict | None = None) -> torch.optim.Optimizer:
        """A torch optimizer of the inner class over the model's parameters (or what
        ``keys``, ``{id(param): tensor}``, maps them to: the checkpoint's tensors) holding
        the whole state, gathered over DP (collective: one all-gather per bucket and state)."""
        full = self.empty_unsharded(keys)
        key = _key_of(keys)
        for bucket in self._all_buckets():
            for p, entries in _gathered(bucket, self.inner.state).items():
                full.state[key(p)] = entries
        return full

    def empty_unsharded(self, keys: dict | None = None) -> torch.optim.Optimizer:
        """An unsharded optimizer of the inner class with no state (see :meth:`unsharded`)."""
        key = _key_of(keys)
        return self.inner_class([{**g, "params": [key(p) for p in g["params"]]} for g in self.param_groups])

    @torch.no_grad()
    def load_unsharded(self, full: torch.optim.Optimizer, keys: dict | None = None) -> None:
        """Take this rank's slice of ``full``'s state (and its hyperparameters)."""
        key = _key_of(keys)
        for group, saved in zip(self.param_groups, full.param_groups, strict=True):
            group.update(_hypers(saved))
        self.inner.state.clear()
        for piece in self._pieces():
            saved = full.state.get(key(piece.param), {})
            span = slice(piece.start, piece.start + piece.length)
            self.inner.state[piece.view] = {
                k: (v.reshape(-1)[span] if v.shape == piece.param.shape else v).clone()
                for k, v in saved.items()}


def _key_of(keys: dict | None):
    return (lambda p: p) if keys is None else (lambda p: keys[id(p)])


def _gathered(bucket: _Bucket, state) -> dict[torch.Tensor, dict[str, torch.Tensor]]:
    """``{param: {key: full tensor or scalar}}`` of one bucket (one all-gather per key)."""
    first = state.get(bucket.pieces[0].view, {})
    if not first:  # no step taken yet (on every rank alike)
        return {}
    keys = sorted(k for k, v in first.items() if v.dim() == 1)  # per element; the rest are scalars
    whole = {k: bucket.gather_state([state[piece.view][k] for piece in bucket.pieces]) for k in keys}
    scalars = {k: v for k, v in first.items() if k not in whole}
    out, start = {}, 0
    for p in bucket.params:
        out[p] = {**{k: v.clone() for k, v in scalars.items()},
                  **{k: full[start:start + p.numel()].view_as(p).clone() for k, full in whole.items()}}
        start += p.numel()
    return out


def _piece_sumsq(piece: _Piece, tp_size: int) -> torch.Tensor:
    """The piece's share of the squared gradient norm: each element weighted by 1 / (TP
    ranks holding it), as :func:`raytp.params.sumsq_once` weighs a whole parameter."""
    spec, grad = get_spec(piece.param), piece.view.grad
    squares = (grad if grad.dtype == torch.float64 else grad.float()).pow(2)
    if spec is None or isinstance(spec.placement, Replicate):
        return squares.sum() / tp_size
    if all(replicas == 1 for _, replicas in spec.local_blocks()):
        return squares.sum()
    weights = _element_weights(piece.param, spec).reshape(-1)[piece.start:piece.start + piece.length]
    return (squares * weights.to(squares.dtype)).sum()


def _element_weights(param: torch.Tensor, spec) -> torch.Tensor:
    """1 / (TP ranks holding each element) of a sharded parameter, in its local shape."""
    dim, parts = spec.placement.dim, []
    for size, replicas in spec.local_blocks():
        shape = list(param.shape)
        shape[dim] = size
        parts.append(torch.full(shape, 1.0 / replicas, dtype=torch.float64, device=param.device))
    return torch.cat(parts, dim)


def _sync_tp_grads(params: list[torch.Tensor]) -> None:
    """Step 1 of :func:`raytp.sync_grads`: TP partial sums completed."""
    for comm, group in grad_reduce_groups(params).items():
        for p in group:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        if comm.size > 1:
            _reduce_partial_grads(group, comm)


def _by_dtype(params) -> list[list[torch.Tensor]]:
    out: dict[torch.dtype, list[torch.Tensor]] = {}
    for p in params:
        if p.numel() and p.requires_grad:  # a frozen parameter gets no state, as in torch's optimizers
            out.setdefault(p.dtype, []).append(p)
    return list(out.values())


def _hypers(group: dict) -> dict:
    return {k: v for k, v in group.items() if k != "params"}


def build_sharded(inner: type[torch.optim.Optimizer], params, hypers: dict,
                  mesh: DeviceMesh | None) -> torch.optim.Optimizer:
    """``inner`` over ``params`` sharded over ``mesh``'s DP group; at dp=1 the plain
    optimizer (logged once, from global rank 0)."""
    if mesh is None:
        raise ValueError("shard_over_dp=True needs the mesh: build the optimizer with "
                         "spec.build(params, mesh=mesh) (build_engine does)")
    if mesh.dp_size == 1:
        if mesh.rank == 0:
            log.info("shard_over_dp=True at dp=1: nothing to shard; the plain %s is used", inner.__name__)
        return inner(params, **hypers)
    return ShardedOptimizer(params, inner, hypers, mesh)


def _keys(model) -> dict | None:
    """``{id(param): tensor}``: what the checkpoint's ``model`` holds for each parameter the
    optimizer steps, where it is not the parameter itself (a view of DP-sharded masters,
    :mod:`raytp.zero_mixed`)."""
    return getattr(model, "tensor_of", None)


def unsharded(optimizer, model=None):
    """What a checkpoint of ``model`` saves: the whole state (a collective over DP for a
    sharded optimizer, which every rank must call), else ``optimizer`` itself."""
    return optimizer.unsharded(_keys(model)) if isinstance(optimizer, ShardedOptimizer) else optimizer


def unsharded_target(optimizer, model=None):
    """What a checkpoint loads into: an empty unsharded optimizer for a sharded one (then
    :func:`finish_load`), else ``optimizer`` itself."""
    if isinstance(optimizer, ShardedOptimizer):
        return optimizer.empty_unsharded(_keys(model))
    return optimizer


def finish_load(optimizer, target, model=None) -> None:
    if isinstance(optimizer, ShardedOptimizer):
        optimizer.load_unsharded(target, _keys(model))
