"""How the TP linear layers of a module overlap their collectives with their GEMMs.

Three settings, the math the same under each (raytp.nn.overlap):
- :func:`set_overlap` on or off: the column-parallel input-gradient all-reduce runs
  asynchronously under the weight-gradient GEMM (on by default on GPU);
- ``set_overlap(..., chunks=k)``: sequence-parallel all-gathers and reduce-scatters
  are cut into ``k`` pieces, each overlapped with another piece's GEMM;
- :func:`use_symm_mem`: sequence-parallel pairs through torch's fused
  symmetric-memory ops, where the TP group can run them.
"""

from __future__ import annotations

import logging

from torch import nn

from raytp.nn.linear import _TPLinear

log = logging.getLogger(__name__)

FALLBACK_CHUNKS = 2  # use_symm_mem's chunked path where the fused ops cannot run
# the settings TPCluster.build(overlap=...) takes: None keeps the device's default
OVERLAP = (None, False, True, "symm_mem")


def _tp_layers(module: nn.Module) -> list[_TPLinear]:
    return [layer for layer in module.modules() if isinstance(layer, _TPLinear)]


def set_overlap(module: nn.Module, enabled: bool, chunks: int | None = None) -> nn.Module:
    """Turn the overlap of collectives with GEMMs on or off in every TP linear layer of
    ``module`` (on by default on GPU, off on CPU). ``chunks`` > 1 also cuts each
    sequence-parallel all-gather / reduce-scatter into that many pieces overlapped with
    the GEMM pieces; it is 1 by default, because on 2 NVLink-connected H200s the chunked
    path measured slower than the plain one (docs/benchmarks.md). The math is the same
    either way. Returns ``module``."""
    if chunks is not None and (not isinstance(chunks, int) or chunks < 1):
        raise ValueError(f"chunks={chunks!r} must be a positive integer")
    for layer in _tp_layers(module):
        layer.overlap = enabled
        if chunks is not None:
            layer.overlap_chunks = chunks
    return module


def use_symm_mem(module: nn.Module) -> str | None:
    """Run the sequence-parallel all-gather -> GEMM and GEMM -> reduce-scatter pairs of
    ``module`` through torch's fused symmetric-memory ops (and turn overlap on).

    Collective: every rank of the TP group calls it, once the model is built. The first
    call on a group checks that all its ranks can run the ops (CUDA, NCCL, GPUs that
    map each other's memory; :func:`raytp.comm.symm_mem.probe`). Returns None when they
    are used; otherwise the reason, logged as a warning, and the layers fall back to the
    chunked path (``chunks`` as set, at least 2). Layers without sequence parallelism
    are unchanged."""
    layers = [layer for layer in _tp_layers(module) if layer.sequence_parallel]
    comms = {id(layer.mesh.tp_comm): layer.mesh.tp_comm for layer in layers}
    reasons = {key: comm.enable_symm_mem() for key, comm in comms.items()}
    for layer in layers:
        layer.overlap = True
        reason = reasons[id(layer.mesh.tp_comm)]
        layer.symm_mem = reason is None
        if reason is not None:
            layer.overlap_chunks = max(layer.overlap_chunks, FALLBACK_CHUNKS)
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
