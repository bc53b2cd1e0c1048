"""The collective backends behind one small interface.

A :class:`Communicator` is one group of ranks (a TP group, a DP group) and the
collectives among them. Every op takes contiguous tensors and works along dim 0;
the dim-aware helpers in :mod:`raytp.comm.functional` build on these. Each op is
reported to the collective counter before it is issued, and the last op entered
is kept in :attr:`Communicator.last_entered` so a stuck rank can say where it is.
Under ``torch.compile`` every op is a graph break: it runs eager, and is counted.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod

import torch
import torch.distributed as dist

from raytp.comm import symm_mem
from raytp.comm.counter import CollectiveRecord, current_tag, record


class Communicator(ABC):
    """Collectives among ``size`` ranks; this rank is ``rank`` within the group.

    Ops with ``async_op=True`` return a handle with ``wait()``; otherwise ``None``.
    Outputs are written in place into the tensors passed as ``out``.
    """

    def __init__(self, rank: int, size: int, name: str):
        self.rank = rank
        self.size = size
        self.name = name
        self.seq = 0
        self.last_entered: CollectiveRecord | None = None
        self.entered_at = 0.0  # time.monotonic() when last_entered was issued
        self.blocked = False  # inside a blocking call of last_entered right now

    def all_reduce(self, tensor: torch.Tensor, *, async_op: bool = False):
        """Sum ``tensor`` over the group, in place."""
        return self._issue("all_reduce", tensor, lambda: self._all_reduce(tensor, async_op), async_op)

    def all_reduce_max(self, tensor: torch.Tensor):
        """Element-wise maximum of ``tensor`` over the group, in place (counted as ``all_reduce_max``)."""
        return self._issue("all_reduce_max", tensor, lambda: self._all_reduce_max(tensor), False)

    def all_gather(self, out: torch.Tensor, tensor: torch.Tensor, *, async_op: bool = False):
        """``out`` (size * n, ...) receives every rank's ``tensor`` (n, ...) in rank order."""
        return self._issue("all_gather", tensor, lambda: self._all_gather(out, tensor, async_op), async_op)

    def reduce_scatter(self, out: torch.Tensor, tensor: torch.Tensor, *, async_op: bool = False):
        """``out`` (n, ...) receives this rank's chunk of the sum of ``tensor`` (size * n, ...)."""
        return self._issue(
            "reduce_scatter", tensor, lambda: self._reduce_scatter(out, tensor, async_op), async_op
        )

    def all_to_all(self, out: torch.Tensor, tensor: torch.Tensor):
        """Chunk k of ``tensor`` along dim 0 goes to rank k; ``out``'s chunk k comes from rank k."""
        return self._issue("all_to_all", tensor, lambda: self._all_to_all(out, tensor), False)

    def broadcast(self, tensor: torch.Tensor, src: int = 0):
        """Copy ``tensor`` from group rank ``src`` to every rank, in place."""
        return self._issue("broadcast", tensor, lambda: self._broadcast(tensor, src), False)

    def scatter(self, out: torch.Tensor, chunks: list[torch.Tensor] | None, src: int = 0):
        """Group rank ``src`` sends ``chunks[k]`` to rank k, into ``out``."""
        return self._issue("scatter", out, lambda: self._scatter(out, chunks, src), False)

    def all_gather_matmul(self, a: torch.Tensor, b: torch.Tensor, dim: int):
        """``(a_full, a_full @ b)`` with ``a_full`` every rank's ``a`` joined along ``dim``,
        the gather pipelined with the GEMM in one fused op (``b`` is (K, N)). Counted as
        one all_gather of ``a``. Only where :meth:`enable_symm_mem` returned None."""
        return self._issue("all_gather", a, lambda: self._all_gather_matmul(a, b, dim), False)

    def matmul_reduce_scatter(self, a: torch.Tensor, b: torch.Tensor, dim: int) -> torch.Tensor:
        """This rank's chunk along ``dim`` of the sum over the group of ``a @ b``, the
        GEMM pipelined with the reduce-scatter in one fused op. Counted as one
        reduce_scatter of ``a @ b``. Only where :meth:`enable_symm_mem` returned None."""
        nbytes = a[..., :1].numel() * b.shape[-1] * a.element_size()
        return self._issue("reduce_scatter", a, lambda: self._matmul_reduce_scatter(a, b, dim), False,
                           nbytes=nbytes)

    def enable_symm_mem(self) -> str | None:
        """Turn on the fused symmetric-memory ops above if every rank of the group can
        run them (:mod:`raytp.comm.symm_mem`): returns None when they are on, else why
        not. Collective over the group."""
        return f"{type(self).__name__} has no symmetric-memory ops"

    def abort(self) -> None:  # noqa: B027 - optional: a backend that can abort overrides it
        """Abort the communicator so that collectives stuck on a lost peer return
        (best effort; the process is usually ended next)."""

    def barrier(self) -> None:
        self.all_reduce(torch.zeros(1, device=self.device))

    @property
    @abstractmethod
    def device(self) -> torch.device: ...

    @torch.compiler.disable  # under torch.compile a graph break: the collective runs eager, counted
    def _issue(self, kind, tensor, launch, async_op, nbytes=None):
        self.seq += 1
        nbytes = tensor.numel() * tensor.element_size() if nbytes is None else nbytes
        rec = CollectiveRecord(kind, self.name, nbytes, self.seq, current_tag())
        self.last_entered, self.entered_at, self.blocked = rec, time.monotonic(), True
        t0 = time.perf_counter()
        try:
            work = launch()
        finally:
            self.blocked = False
        record(rec, 0.0 if async_op else time.perf_counter() - t0)
        return work

    def where(self) -> dict | None:
        """The last collective this rank issued on this group, and whether it is still
        inside it (for naming a stuck rank); read from another thread."""
        rec = self.last_entered
        if rec is None:
            return None
        return {"group": rec.group, "kind": rec.kind, "seq": rec.seq, "tag": rec.tag,
                "nbytes": rec.nbytes, "blocked": self.blocked,
                "seconds": time.monotonic() - self.entered_at}

    @abstractmethod
    def _all_reduce(self, tensor, async_op): ...

    def _all_reduce_max(self, tensor):
        raise NotImplementedError(f"{type(self).__name__} has no max all-reduce")

    @abstractmethod
    def _all_gather(self, out, tensor, async_op): ...

    def _all_gather_matmul(self, a, b, dim):
        raise NotImplementedError(f"{self!r}: fused all-gather GEMM without enable_symm_mem()")

    def _matmul_reduce_scatter(self, a, b, dim):
        raise NotImplementedError(f"{self!r}: fused GEMM reduce-scatter without enable_symm_mem()")

    @abstractmethod
    def _reduce_scatter(self, out, tensor, async_op): ...

    @abstractmethod
    def _all_to_all(self, out, tensor): ...

    @abstractmethod
    def _broadcast(self, tensor, src): ...

    @abstractmethod
    def _scatter(self, out, chunks, src): ...

    def __repr__(self):
        return f"{type(self).__name__}({self.name}: rank {self.rank} of {self.size})"


# torch 2.13 renamed the tensor collectives; older releases have only the old names.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


class TorchCommunicator(Communicator):
    """A ``torch.distributed`` process group (NCCL on GPU, gloo on CPU).

    ``native_reduce_scatter=False`` replaces reduce-scatter by an all-reduce and a
    slice: older gloo builds lack reduce-scatter, and the fallback is tested on
    every build. ``None`` (the default) tries the native op and falls back for good
    the first time the backend refuses it.
    """

    def __init__(self, group: dist.ProcessGroup, name: str, device: torch.device, *,
                 native_reduce_scatter: bool | None = None):
        super().__init__(dist.get_rank(group), dist.get_world_size(group), name)
        self.group = group
        self.global_ranks = dist.get_process_group_ranks(group)
        self.native_reduce_scatter = native_reduce_scatter
        self._device = torch.device(device)
        self.symm_mem = False  # the fused symmetric-memory ops are on (enable_symm_mem)

    @property
    def device(self) -> torch.device:
        return self._device

    def enable_symm_mem(self) -> str | None:
        if not self.symm_mem:
            reason = symm_mem.probe(self)
            self.symm_mem = reason is None
            return reason
        return None

    def _all_gather_matmul(self, a, b, dim):
        if not self.symm_mem:
            return super()._all_gather_matmul(a, b, dim)
        a_full, (out,) = symm_mem.ops().all_gather_matmul(a, [b], dim, self.group.group_name)
        return a_full, out

    def _matmul_reduce_scatter(self, a, b, dim):
        if not self.symm_mem:
            return super()._matmul_reduce_scatter(a, b, dim)
        return symm_mem.ops().matmul_reduce_scatter(a, b, "sum", dim, self.group.group_name)

    def abort(self) -> None:
        abort = getattr(self.group, "abort", None)  # ProcessGroup.abort, torch >= 2.6
        if abort is not None:
            abort()

    def _all_reduce(self, tensor, async_op):
        return dist.all_reduce(tensor, group=self.group, async_op=async_op)

    def _all_reduce_max(self, tensor):
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX, group=self.group)

    def _all_gather(self, out, tensor, async_op):
        return _all_gather_single(out, tensor, group=self.group, async_op=async_op)

    def _reduce_scatter(self, out, tensor, async_op):
        if self.native_reduce_scatter is not False:
            try:
                return _reduce_scatter_single(out, tensor, group=self.group, async_op=async_op)
            except (RuntimeError, NotImplementedError):
                if self.native_reduce_scatter:
                    raise
                self.native_reduce_scatter = False
        summed = tensor.clone()
        dist.all_reduce(summed, group=self.group)
        out.copy_(summed.chunk(self.size)[self.rank])
        return _Done() if async_op else None

    def _all_to_all(self, out, tensor):
        dist.all_to_all_single(out, tensor, group=self.group)

    def _broadcast(self, tensor, src):
        dist.broadcast(tensor, src=self.global_ranks[src], group=self.group)

    def _scatter(self, out, chunks, src):
        if self.rank != src:
            chunks = None
        elif chunks is not None:
            chunks = [c.contiguous() for c in chunks]
        dist.scatter(out, chunks, src=self.global_ranks[src], group=self.group)


class _Done:
    """The handle of an op that already finished."""

    def wait(self):
        return True
