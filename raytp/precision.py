"""Mixed precision: compute in a narrow dtype, step full-precision master weights.

``MixedPrecision(param_dtype="bfloat16", master_dtype="float32", reduce_dtype="float32")``
(``build(..., precision=...)``) works as Megatron's main params / main grads do:

- The model is built as usual (its config's dtype, float32 by default); each parameter
  shard is copied into a **master** of ``master_dtype`` (same shape, same
  :class:`~raytp.params.ParamSpec`), then the model is cast to ``param_dtype``: forward
  and backward run in ``param_dtype``.
- The optimizer is built over the masters, so its states are ``master_dtype`` too.
- After each backward (each micro-batch), the model's gradients are added into the
  masters' (``master_dtype``) and dropped: accumulation runs in full precision.
- The gradient sync (TP partial sums, DP mean) runs in ``reduce_dtype``: on the masters'
  gradients when it is ``master_dtype``, else through the model's gradient buffers (when
  it is ``param_dtype``), cast back into the masters after. Norm and clipping see the
  masters' gradients.
- After the optimizer step the masters are rounded into the model's parameters.
- Checkpoints and exports hold the masters under the model's names
  (:meth:`MasterWeights.view`), so a checkpoint loads into a mixed or a full-precision
  build alike.

With a DP-sharded optimizer (``shard_over_dp=True`` at dp > 1) the masters are sharded
with the optimizer state instead (:mod:`raytp.zero_mixed`): each DP rank keeps 1/dp.

float16 is not offered: it needs loss scaling, which raytp does not do.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from raytp.mesh import DeviceMesh
from raytp.optim import sync_grads
from raytp.params import get_spec, set_spec

DTYPES = ("bfloat16", "float32", "float64")


@dataclass(frozen=True)
class MixedPrecision:
    """Compute in ``param_dtype``, step masters of ``master_dtype``, reduce gradients in
    ``reduce_dtype`` (``param_dtype`` or ``master_dtype``). Names from :data:`DTYPES`
    (a ``torch.dtype`` is taken by its name)."""

    param_dtype: str = "bfloat16"
    master_dtype: str = "float32"
    reduce_dtype: str = "float32"

    def __post_init__(self):
        for field in ("param_dtype", "master_dtype", "reduce_dtype"):
            value = getattr(self, field)
            name = str(value).removeprefix("torch.") if isinstance(value, torch.dtype) else value
            if name not in DTYPES:
                hint = " (float16 needs loss scaling, which raytp does not do: use bfloat16)" \
                    if name == "float16" else ""
                raise ValueError(f"MixedPrecision: {field}={value!r} is not one of {DTYPES}{hint}")
            object.__setattr__(self, field, name)
        if self.reduce_dtype not in (self.param_dtype, self.master_dtype):
            raise ValueError(f"MixedPrecision: reduce_dtype={self.reduce_dtype!r} must be param_dtype="
                             f"{self.param_dtype!r} or master_dtype={self.master_dtype!r}")

    def torch_dtype(self, field: str) -> torch.dtype:
        return getattr(torch, getattr(self, field))


def apply_precision(model: nn.Module, policy: MixedPrecision | None, trains: bool) -> MasterWeights | None:
    """Cast ``model`` to the policy's ``param_dtype``; for a training rank first keep its
    masters (returned; None without a policy or on an inference-only rank)."""
    if policy is None:
        return None
    masters = MasterWeights(model, policy) if trains else None
    model.to(dtype=policy.torch_dtype("param_dtype"))  # in place: the parameters (and specs) stay
    return masters


class MasterWeights:
    """The ``master_dtype`` copy of a model's parameter shards, and the moves of values and
    gradients between the two. ``params`` are the model's, ``masters`` theirs, in the
    order of ``model.named_parameters()``. No collectives but :meth:`sync_grads`'."""

    def __init__(self, model: nn.Module, policy: MixedPrecision):
        self.model, self.policy = model, policy
        named = list(model.named_parameters())
        self.names = [name for name, _ in named]
        self.params = [p for _, p in named]
        self.masters = [_master(p, policy.torch_dtype("master_dtype")) for p in self.params]
        self._master_of = {id(p): m for p, m in zip(self.params, self.masters, strict=True)}

    @torch.no_grad()
    def accumulate_grads(self) -> None:
        """Add each model gradient (``param_dtype``) into its master's gradient and drop it."""
        for p, m in zip(self.params, self.masters, strict=True):
            if p.grad is None:
                continue
            grad = p.grad.to(m.dtype)
            if m.grad is None:
                m.grad = grad if grad is not p.grad else grad.clone()
            else:
                m.grad.add_(grad)
            p.grad = None

    def sync_grads(self, mesh: DeviceMesh) -> None:
        """:func:`raytp.sync_grads` of the masters' gradients, in ``reduce_dtype``."""
        if self.policy.reduce_dtype == self.policy.master_dtype:
            sync_grads(self.masters, mesh)
            return
        _move_grads(self.masters, self.params)
        sync_grads(self.params, mesh)
        _move_grads(self.params, self.masters)

    def grad_params(self) -> list[nn.Parameter]:
        """What holds the gradients until the step: the masters."""
        return self.masters

    @torch.no_grad()
    def to_model(self, loaded: MasterView | None = None) -> None:
        """Round the masters into the model's parameters (after a step, or a load into
        ``loaded``, a :meth:`view`: it holds the masters themselves)."""
        for p, m in zip(self.params, self.masters, strict=True):
            p.copy_(m)

    def view(self) -> MasterView:
        return MasterView(self)


class MasterView:
    """The masters dressed as the model for checkpoints and exports: its parameter names
    (a tied one once, or under every name), its ``config`` and dropout ``rng``."""

    def __init__(self, weights: MasterWeights):
        self._weights = weights
        self.config = getattr(weights.model, "config", None)
        self.rng = getattr(weights.model, "rng", None)

    def named_parameters(self, remove_duplicate: bool = True):
        master_of = self._weights._master_of
        for name, p in self._weights.model.named_parameters(remove_duplicate=remove_duplicate):
            yield name, master_of[id(p)]

    def parameters(self):
        return iter(self._weights.masters)


def _master(param: nn.Parameter, dtype: torch.dtype) -> nn.Parameter:
    master = nn.Parameter(param.detach().to(dtype, copy=True), requires_grad=param.requires_grad)
    spec = get_spec(param)
    return set_spec(master, spec) if spec is not None else master


@torch.no_grad()
def _move_grads(sources: list[torch.Tensor], targets: list[torch.Tensor]) -> None:
    """Each target's gradient becomes its source's, cast to the target's dtype; the
    sources' are dropped."""
    for src, dst in zip(sources, targets, strict=True):
        dst.grad = src.grad.to(dst.dtype) if src.grad is not None else None
        src.grad = None
