"""PyTorch's fused symmetric-memory GEMM collectives, for sequence parallelism.

``torch.ops.symm_mem.fused_all_gather_matmul`` gathers ``A`` along a dim while it
multiplies the pieces already here by ``B``; ``fused_matmul_reduce_scatter``
multiplies piece by piece and moves each partial product to the rank that owns it
while the next one is computed. The pieces travel by copy engines through memory
that every rank of the group maps (CUDA P2P over NVLink), so no NCCL kernel takes
SMs from the GEMMs. They need CUDA, an NCCL group, a torch build with the ops, and
GPUs that can map each other's memory; multicast is never needed (it stays off).

:func:`probe` finds out, once per communicator, whether the group can use them; the
ops themselves are reached through :class:`~raytp.comm.backend.Communicator`'s
``all_gather_matmul`` and ``matmul_reduce_scatter``, so they are counted like every
other collective.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

if TYPE_CHECKING:
    from raytp.comm.backend import TorchCommunicator


@dataclass(frozen=True)
class FusedOps:
    """The two fused ops, with torch's signatures:
    ``all_gather_matmul(A_shard, [B], gather_dim, group_name) -> (A, [A @ B])`` and
    ``matmul_reduce_scatter(A, B, "sum", scatter_dim, group_name) -> chunk of sum(A @ B)``."""

    all_gather_matmul: Callable
    matmul_reduce_scatter: Callable


@functools.cache
def ops() -> FusedOps | None:
    """torch's fused ops, or None when this build has none."""
    try:
        import torch.distributed._symmetric_memory  # noqa: F401 - registers the ops' CUDA kernels

        return FusedOps(torch.ops.symm_mem.fused_all_gather_matmul,
                        torch.ops.symm_mem.fused_matmul_reduce_scatter)
    except (ImportError, AttributeError, RuntimeError):
        return None


def _local_reason(comm: TorchCommunicator) -> str | None:
    """Why this rank cannot use the fused ops, judged without talking to the others."""
    if comm.device.type != "cuda":
        return f"they need CUDA tensors; this group computes on {comm.device}"
    backend = str(dist.get_backend(comm.group)).lower()
    if "nccl" not in backend:
        return f"they need an NCCL group; this one is {backend}"
    if ops() is None:
        return f"torch {torch.__version__} has no torch.ops.symm_mem fused GEMM collectives"
    return None


def _agree(ok: bool, comm: TorchCommunicator) -> bool:
    """True on every rank when ``ok`` is true on every rank of the group."""
    failed = torch.tensor([0.0 if ok else 1.0], device=comm.device)
    comm.all_reduce_max(failed)
    return failed.item() == 0.0


def probe(comm: TorchCommunicator) -> str | None:
    """None when every rank of ``comm``'s group can run the fused ops, else why not (the
    same answer on every rank). Collective: every rank of the group calls it. Both ops
    run once on a few bytes, so a host whose GPUs cannot map each other's memory is
    found here, not in a training step."""
    reason = _local_reason(comm)
    if not _agree(reason is None, comm):
        return reason or "another rank of the group cannot use them"
    name, fused = comm.group.group_name, ops()
    try:
        a = torch.ones(1, 2, 8, device=comm.device)  # (B, T / size, K), every entry 1
        b = torch.ones(8, 4, device=comm.device)
        gathered, (y,) = fused.all_gather_matmul(a, [b], 1, name)  # (1, 2 * size, 4) of 8s
        z = fused.matmul_reduce_scatter(y, b.t(), "sum", 1, name)  # (1, 2, 8) of 32 * size
        if gathered.shape != (1, 2 * comm.size, 8) or not (bool((y == 8).all())
                                                           and bool((z == 32 * comm.size).all())):
            reason = "a check of the fused ops on this group gave wrong numbers"
    except Exception as e:  # noqa: BLE001 - any failure means: use the fallback
        reason = f"{type(e).__name__}: {e}"
    if not _agree(reason is None, comm):
        return reason or "the fused ops failed on another rank of the group"
    return None
