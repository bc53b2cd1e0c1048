"""A communicator that issues no collectives, for measuring exposed communication.

A raytp model built on :func:`null_mesh` runs exactly its compute (every GEMM,
every copy and reshape around a collective) with each collective replaced by
nothing: outputs are left as they are (an all-reduce leaves the partial sum, an
all-gather leaves the rest of ``out`` unwritten), so the numbers are wrong but the
kernels are the same. The time of a step on it, subtracted from the same step on a
real communicator, is the communication that the step does not hide behind compute.
Every op is still reported to :func:`raytp.comm.count_collectives`.
"""

from __future__ import annotations

import torch

from raytp.comm.backend import Communicator
from raytp.mesh import DeviceMesh


class _Done:
    def wait(self) -> bool:
        return True

    def is_completed(self) -> bool:
        return True


class NullCommunicator(Communicator):
    """Rank ``rank`` of a group of ``size`` that never communicates; ops only record."""

    def __init__(self, rank: int, size: int, name: str, device: torch.device | str):
        super().__init__(rank, size, name)
        self._device = torch.device(device)

    @property
    def device(self) -> torch.device:
        return self._device

    def _nothing(self, async_op: bool = False):
        return _Done() if async_op else None

    def _all_reduce(self, tensor, async_op):
        return self._nothing(async_op)

    def _all_reduce_max(self, tensor):
        return None

    def _all_gather(self, out, tensor, async_op):
        return self._nothing(async_op)

    def _reduce_scatter(self, out, tensor, async_op):
        return self._nothing(async_op)

    def _all_to_all(self, out, tensor):
        return None

    def _broadcast(self, tensor, src):
        return None

    def _scatter(self, out, chunks, src):
        return None


def null_mesh(mesh: DeviceMesh) -> DeviceMesh:
    """``mesh``'s layout (ranks, sizes, device) with communicators that do nothing."""
    tp = NullCommunicator(mesh.tp_rank, mesh.tp_size, "tp", mesh.device)
    dp = NullCommunicator(mesh.dp_rank, mesh.dp_size, "dp", mesh.device)
    return DeviceMesh.from_communicators(tp, dp, mesh.device)
