"""LayerNorm and RMSNorm with replicated parameters, for the replicated (or
sequence-parallel) regions of a TP model."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from raytp.mesh import DeviceMesh
from raytp.params import ParamSpec, set_spec
from raytp.placement import Replicate


class _ReplicatedNorm(nn.Module):
    """Weight (and bias) of shape (dim,), whole on every rank.

    Replicated input (..., dim): every rank computes the same gradient. Under
    sequence parallelism the input is (B, T / tp, dim), each rank's gradient is a
    partial sum over its chunk of the sequence, and the spec's ``grad_reduce`` makes
    :func:`raytp.sync_grads` sum it over the TP group.
    Collectives: none in forward or backward.
    """

    def __init__(self, dim, mesh, eps, bias, sequence_parallel, device, dtype):
        super().__init__()
        self.dim, self.eps, self.sequence_parallel = dim, eps, sequence_parallel
        grad_reduce = mesh.tp_comm if sequence_parallel else None
        spec = ParamSpec(Replicate(), torch.Size((dim,)), mesh.tp_size, grad_reduce=grad_reduce)
        factory = {"device": device, "dtype": dtype}
        self.weight = set_spec(nn.Parameter(torch.empty(dim, **factory)), spec)
        if bias:
            self.bias = set_spec(nn.Parameter(torch.empty(dim, **factory)), spec)
        else:
            self.register_parameter("bias", None)
        if self.weight.device.type != "meta":
            self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def extra_repr(self):
        return (f"{self.dim}, eps={self.eps}, bias={self.bias is not None}"
                + (", sequence_parallel=True" if self.sequence_parallel else ""))


class LayerNorm(_ReplicatedNorm):
    """``nn.LayerNorm(dim)`` over the last dim, its weight and bias replicated (see
    :class:`_ReplicatedNorm` for sequence parallelism)."""

    def __init__(self, dim: int, *, mesh: DeviceMesh, eps: float = 1e-5, bias: bool = True,
                 sequence_parallel: bool = False, device=None, dtype=None):
        super().__init__(dim, mesh, eps, bias, sequence_parallel, device, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, (self.dim,), self.weight, self.bias, self.eps)


class RMSNorm(_ReplicatedNorm):
    """``x / sqrt(mean(x^2) + eps) * weight`` over the last dim (``nn.RMSNorm``), its
    weight replicated (see :class:`_ReplicatedNorm` for sequence parallelism)."""

    def __init__(self, dim: int, *, mesh: DeviceMesh, eps: float = 1e-5,
                 sequence_parallel: bool = False, device=None, dtype=None):
        super().__init__(dim, mesh, eps, False, sequence_parallel, device, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (self.dim,), self.weight, self.eps)
