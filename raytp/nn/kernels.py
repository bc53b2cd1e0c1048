"""How a TP linear layer runs its GEMM and its collectives: one kernel object, chosen once.

A layer's constructor arguments fix its math and its shapes, and with them its
:class:`Family`: the kernels that compute exactly that math. The layer holds one of
them, ``layer.kernel``, and its forward makes one call, ``kernel(x, weight, bias,
comm)``. The choice is made when the layer is built (overlap on GPU, plain on CPU) and
again only by :func:`set_overlap` and :func:`use_symm_mem`, which replace the object.

Column-parallel (``y = x W_r^T + b_r``; bias the local slice):
- replicated input (..., K) -> (..., N_r): :class:`CopyTo`, :class:`AsyncInputGrad`;
- sequence-split input (B, T / tp, K) -> (B, T, N_r): :class:`AllGather`,
  :class:`ChunkedAllGather`, :class:`SymmMemAllGather`.

Row-parallel (``y = sum_r x_r W_r^T + b``; bias the full one, added once after the reduction):
- (..., K_r) -> (..., N): :class:`AllReduce`; :class:`NoReduce` (``reduce_output=False``);
- (B, T, K_r) -> (B, T / tp, N): :class:`ReduceScatter`, :class:`ChunkedReduceScatter`,
  :class:`SymmMemReduceScatter`.

Within a family the kernels issue collectives of the same kinds and compute the same
math; the overlapped ones only reorder independent work (:mod:`raytp.nn.overlap`).
The ``setting`` a family chooses by is one of :data:`OVERLAP`, as ``TPCluster.build``
takes it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import nn

from raytp.comm import ops
from raytp.comm.backend import Communicator
from raytp.comm.functional import check_divisible
from raytp.mesh import DeviceMesh
from raytp.nn.overlap import (
    SEQ_DIM,
    Chunked,
    SymmMem,
    all_gather_linear,
    linear_async_grad,
    linear_reduce_scatter,
)

log = logging.getLogger(__name__)

FALLBACK_CHUNKS = 2  # use_symm_mem's chunked path where the fused ops cannot run
# the settings TPCluster.build(overlap=...) takes: None keeps the device's default
OVERLAP = (None, False, True, "symm_mem")


def _check_chunks(chunks) -> int:
    if not isinstance(chunks, int) or chunks < 1:
        raise ValueError(f"chunks={chunks!r} must be a positive integer")
    return chunks


class Kernel:
    """``kernel(x, weight, bias, comm) -> y``. The class attributes describe it:
    ``overlapped`` (a collective runs under a GEMM), ``chunks`` (sequence-parallel
    pieces), ``symm_mem`` (torch's fused symmetric-memory ops)."""

    overlapped = False
    chunks = 1
    symm_mem = False

    def __call__(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                 comm: Communicator) -> torch.Tensor:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class _Chunked(Kernel):
    overlapped = True

    def __init__(self, chunks: int):
        self.chunks = _check_chunks(chunks)
        self.pair = Chunked(chunks)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.chunks})"


class _SymmMem(Kernel):
    overlapped = True
    symm_mem = True
    pair = SymmMem()


# column-parallel, replicated input


class CopyTo(Kernel):
    """``F.linear(copy_to(x))``. Collectives: forward none; backward one all-reduce."""

    def __call__(self, x, weight, bias, comm):
        return F.linear(ops.copy_to(x, comm), weight, bias)


class AsyncInputGrad(Kernel):
    """As :class:`CopyTo`, the backward's all-reduce running under the weight-gradient
    GEMM (:func:`raytp.nn.overlap.linear_async_grad`)."""

    overlapped = True

    def __call__(self, x, weight, bias, comm):
        return linear_async_grad(x, weight, bias, comm)


# column-parallel, sequence-split input


class AllGather(Kernel):
    """``F.linear(all_gather_seq(x))``. Collectives: forward one all-gather; backward one
    reduce-scatter."""

    def __call__(self, x, weight, bias, comm):
        return F.linear(ops.all_gather_seq(x, comm, SEQ_DIM), weight, bias)


class ChunkedAllGather(_Chunked):
    """As :class:`AllGather` in ``chunks`` pieces, each gather under another piece's GEMM.
    Collectives: forward ``chunks`` all-gathers; backward ``chunks`` reduce-scatters."""

    def __call__(self, x, weight, bias, comm):
        return all_gather_linear(x, weight, bias, comm, self.pair)


class SymmMemAllGather(_SymmMem):
    """As :class:`AllGather` through torch's fused all-gather-matmul (the communicator must
    have ``enable_symm_mem`` on). Collectives: one fused all-gather; backward one fused
    reduce-scatter."""

    def __call__(self, x, weight, bias, comm):
        return all_gather_linear(x, weight, bias, comm, self.pair)


# row-parallel


def _plus(y: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return y if bias is None else y + bias


def _check_seq(x: torch.Tensor, comm: Communicator) -> None:
    check_divisible(x.shape[SEQ_DIM], comm.size, "sequence length T (sequence_parallel)")


class AllReduce(Kernel):
    """``reduce_from(F.linear(x)) + b``. Collectives: forward one all-reduce; backward none."""

    def __call__(self, x, weight, bias, comm):
        return _plus(ops.reduce_from(F.linear(x, weight), comm), bias)


class NoReduce(Kernel):
    """``F.linear(x)``, a partial sum left for the caller to reduce; the bias is added on
    rank 0 only, so that the sum is right. Collectives: none."""

    def __call__(self, x, weight, bias, comm):
        return _plus(F.linear(x, weight), bias if comm.rank == 0 else None)


class ReduceScatter(Kernel):
    """``reduce_scatter_seq(F.linear(x)) + b``. Collectives: forward one reduce-scatter;
    backward one all-gather."""

    def __call__(self, x, weight, bias, comm):
        _check_seq(x, comm)
        return _plus(ops.reduce_scatter_seq(F.linear(x, weight), comm, SEQ_DIM), bias)


class ChunkedReduceScatter(_Chunked):
    """As :class:`ReduceScatter` in ``chunks`` pieces, each reduce-scatter under the next
    piece's GEMM. Collectives: forward ``chunks`` reduce-scatters; backward ``chunks``
    all-gathers."""

    def __call__(self, x, weight, bias, comm):
        _check_seq(x, comm)
        return _plus(linear_reduce_scatter(x, weight, comm, self.pair), bias)


class SymmMemReduceScatter(_SymmMem):
    """As :class:`ReduceScatter` through torch's fused matmul-reduce-scatter. Collectives:
    forward one fused reduce-scatter; backward one fused all-gather."""

    def __call__(self, x, weight, bias, comm):
        _check_seq(x, comm)
        return _plus(linear_reduce_scatter(x, weight, comm, self.pair), bias)


@dataclass(frozen=True)
class Family:
    """The kernels that compute one layer's math: ``plain`` (the collective, then the
    GEMM or the reverse) and, where the layer has them, ``overlapped`` (no chunks),
    ``chunked(chunks)`` and ``symm_mem``."""

    plain: Callable[[], Kernel]
    overlapped: Callable[[], Kernel] | None = None
    chunked: Callable[[int], Kernel] | None = None
    symm_mem: Callable[[], Kernel] | None = None

    def choose(self, setting: bool | str, chunks: int = 1) -> Kernel:
        """The kernel for ``setting`` (one of :data:`OVERLAP` but None): False -> plain;
        True -> chunked where ``chunks`` > 1, else ``overlapped``; ``"symm_mem"`` -> the
        fused ops. A kind the family lacks falls back to the next one down, to plain."""
        if setting not in OVERLAP[1:]:
            raise ValueError(f"overlap={setting!r} must be one of {OVERLAP[1:]}")
        if setting == "symm_mem" and self.symm_mem is not None:
            return self.symm_mem()
        if setting and _check_chunks(chunks) > 1 and self.chunked is not None:
            return self.chunked(chunks)
        if setting and self.overlapped is not None:
            return self.overlapped()
        return self.plain()


COLUMN = Family(CopyTo, overlapped=AsyncInputGrad)
COLUMN_SP = Family(AllGather, chunked=ChunkedAllGather, symm_mem=SymmMemAllGather)
ROW = Family(AllReduce)
ROW_PARTIAL = Family(NoReduce)
ROW_SP = Family(ReduceScatter, chunked=ChunkedReduceScatter, symm_mem=SymmMemReduceScatter)


@runtime_checkable
class KernelLayer(Protocol):
    """A layer whose forward runs ``kernel``, one of ``kernel_family`` (raytp's TP linear
    layers)."""

    mesh: DeviceMesh
    kernel: Kernel
    kernel_family: Family


def kernel_layers(module: nn.Module) -> list[KernelLayer]:
    return [layer for layer in module.modules() if isinstance(layer, KernelLayer)]


def set_overlap(module: nn.Module, enabled: bool, chunks: int | None = None) -> nn.Module:
    """Turn the overlap of collectives with GEMMs on or off in every TP linear layer of
    ``module`` (on by default on GPU, off on CPU): each gets a new kernel. ``chunks`` > 1
    also cuts each sequence-parallel all-gather / reduce-scatter into that many pieces
    overlapped with the GEMM pieces; None keeps a layer's current chunks. It is 1 by
    default, because on 2 NVLink-connected H200s the chunked path measured slower than
    the plain one (docs/benchmarks.md). Turning overlap on leaves a layer on the fused
    ops (:func:`use_symm_mem`) there. The math is the same either way. Returns ``module``."""
    if chunks is not None:
        _check_chunks(chunks)
    for layer in kernel_layers(module):
        if enabled and layer.kernel.symm_mem:
            continue
        layer.kernel = layer.kernel_family.choose(bool(enabled), layer.kernel.chunks if chunks is None
                                                  else chunks)
    return module


def use_symm_mem(module: nn.Module) -> str | None:
    """Run the sequence-parallel all-gather -> GEMM and GEMM -> reduce-scatter pairs of
    ``module`` through torch's fused symmetric-memory ops (overlap on).

    Collective: every rank of the TP group calls it, once the model is built. The first
    call on a group checks that all its ranks can run the ops (CUDA, NCCL, GPUs that
    map each other's memory; :func:`raytp.comm.symm_mem.probe`). Returns None when they
    are used; otherwise the reason, logged as a warning, and the layers fall back to the
    chunked path (their chunks, at least 2). Layers without sequence parallelism are
    unchanged."""
    layers = [layer for layer in kernel_layers(module) if layer.kernel_family.symm_mem is not None]
    comms = {id(layer.mesh.tp_comm): layer.mesh.tp_comm for layer in layers}
    reasons = {key: comm.enable_symm_mem() for key, comm in comms.items()}
    for layer in layers:
        if reasons[id(layer.mesh.tp_comm)] is None:
            layer.kernel = layer.kernel_family.choose("symm_mem")
        else:
            layer.kernel = layer.kernel_family.choose(True, max(layer.kernel.chunks, FALLBACK_CHUNKS))
    reason = next((r for r in reasons.values() if r is not None), None)
    if reason is not None:
        log.warning("symmetric-memory ops unavailable (%s); the chunked path runs instead", reason)
    return reason


def apply_overlap(module: nn.Module, overlap: bool | str) -> str | None:
    """Apply one of the :data:`OVERLAP` settings but None: False or True
    (:func:`set_overlap`), or ``"symm_mem"`` (overlap on, then :func:`use_symm_mem`,
    whose reason it returns). Collective for ``"symm_mem"``."""
    if overlap not in OVERLAP or overlap is None:
        raise ValueError(f"overlap={overlap!r} must be one of {OVERLAP[1:]}")
    set_overlap(module, bool(overlap))
    return use_symm_mem(module) if overlap == "symm_mem" else None
