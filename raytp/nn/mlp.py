"""The transformer MLP block: column-parallel up projection, row-parallel down."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from raytp.mesh import DeviceMesh
from raytp.nn.fused import Fused
from raytp.nn.linear import ColumnParallelLinear, RowParallelLinear

ACTIVATIONS = ("gelu", "gelu_tanh", "swiglu")  # gelu_tanh: GPT-2's "gelu_new"


def swiglu(h: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` of ``h = [gate | up]`` (..., 2 * ffn) -> (..., ffn)."""
    gate, up = h.chunk(2, dim=-1)
    return F.silu(gate) * up


_fused_swiglu = Fused(swiglu)  # one kernel each way when training on CUDA (raytp.nn.fused)


class ParallelMLP(nn.Module):
    """``fc_out(act(fc_in(x)))`` with the ffn dimension split over the TP group.

    Input and output (..., hidden), replicated; or (B, T / tp, hidden), split along
    the sequence, with ``sequence_parallel``. The (..., ffn / tp) activation in
    between stays on its rank. ``activation="swiglu"`` fuses the gate and up
    projections into one column-parallel GEMM (blocks [gate | up]) and computes
    ``silu(gate) * up``; ``"gelu_tanh"`` is GELU's tanh approximation. ``init_std``
    initializes ``fc_in`` and ``out_init_std`` (default ``init_std``; GPT-2 scales it by
    1 / sqrt(2 n_layers)) ``fc_out``: normal(0, std) weights and zero biases, or
    ``nn.Linear``'s initialization for None. Collectives:
    forward one all-reduce; backward one all-reduce
    (under sequence parallelism each becomes an all-gather and a reduce-scatter).
    """

    def __init__(self, hidden: int, ffn: int, *, mesh: DeviceMesh, activation: str = "gelu",
                 bias: bool = True, sequence_parallel: bool = False, device=None, dtype=None,
                 init_std: float | None = None, out_init_std: float | None = None):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation={activation!r} is not one of {ACTIVATIONS}")
        self.activation = activation
        fused = activation == "swiglu"
        factory = {"mesh": mesh, "bias": bias, "sequence_parallel": sequence_parallel,
                   "device": device, "dtype": dtype}
        self.fc_in = ColumnParallelLinear(hidden, 2 * ffn if fused else ffn,
                                          blocks=(ffn, ffn) if fused else None, init_std=init_std,
                                          **factory)
        self.fc_out = RowParallelLinear(ffn, hidden, init_std=init_std if out_init_std is None
                                        else out_init_std, **factory)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc_in(x)  # (..., ffn_per_rank), or (..., 2 * ffn_per_rank) fused
        if self.activation == "swiglu":
            h = _fused_swiglu(h)
        else:
            h = F.gelu(h, approximate="tanh" if self.activation == "gelu_tanh" else "none")
        return self.fc_out(h)
