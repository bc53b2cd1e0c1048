"""NCCL through CuPy: communicators made from a unique id that the driver hands to
every rank (no TCP rendezvous), collectives issued on raytp's communication stream.

Needs the ``cuda12`` or ``cuda13`` extra (``cupy-cuda12x`` / ``cupy-cuda13x``).
"""

from __future__ import annotations

import torch

from raytp.comm.backend import Communicator
from raytp.mesh import DeviceMesh
from raytp.streams import Streams, StreamWork


def _nccl():
    try:
        from cupy.cuda import nccl
    except ImportError as e:
        raise ImportError(
            "backend='cupy-nccl' needs CuPy with NCCL: pip install 'raytp[cuda12]' (or "
            f"'raytp[cuda13]', matching your CUDA) ({e})") from e
    if not getattr(nccl, "available", True):
        raise ImportError("CuPy is installed but its NCCL library is not available")
    return nccl


def unique_id() -> tuple:
    """A fresh NCCL unique id: made on one rank, sent by the driver to the others."""
    return _nccl().get_unique_id()


_DTYPES = {
    torch.float32: "NCCL_FLOAT32",
    torch.float64: "NCCL_FLOAT64",
    torch.float16: "NCCL_FLOAT16",
    torch.bfloat16: "NCCL_BFLOAT16",
    torch.int64: "NCCL_INT64",
    torch.int32: "NCCL_INT32",
    torch.uint8: "NCCL_UINT8",
    torch.int8: "NCCL_INT8",
    torch.bool: "NCCL_UINT8",
}


class CupyNcclCommunicator(Communicator):
    """One NCCL communicator of ``size`` ranks, made from ``nccl_id``, on ``stream``.

    Each op first makes the communication stream wait for the current (compute)
    stream, so it sees every value computed before it; with ``async_op`` the returned
    handle's ``wait()`` makes the current stream wait for the op, otherwise the current
    stream waits at once. Tensors are marked with ``record_stream``.
    """

    def __init__(self, nccl_id: tuple, rank: int, size: int, name: str, device: torch.device,
                 stream: torch.cuda.Stream):
        super().__init__(rank, size, name)
        self.nccl = _nccl()
        self._device = torch.device(device)
        self.stream = stream
        import cupy

        with cupy.cuda.Device(self._device.index):
            self.comm = self.nccl.NcclCommunicator(size, nccl_id, rank)

    @property
    def device(self) -> torch.device:
        return self._device

    def _dtype(self, tensor: torch.Tensor) -> int:
        if tensor.dtype not in _DTYPES:
            raise TypeError(f"{tensor.dtype} has no NCCL type")
        return getattr(self.nccl, _DTYPES[tensor.dtype])

    def _run(self, launch, tensors, async_op: bool):
        current = torch.cuda.current_stream(self._device)
        self.stream.wait_stream(current)
        launch(self.stream.cuda_stream)
        for t in tensors:
            t.record_stream(self.stream)
        work = StreamWork(self.stream)
        if async_op:
            return work
        work.wait()
        return None

    def _all_reduce(self, tensor, async_op, op="NCCL_SUM"):
        ptr, n, dt = tensor.data_ptr(), tensor.numel(), self._dtype(tensor)
        return self._run(lambda s: self.comm.allReduce(ptr, ptr, n, dt, getattr(self.nccl, op), s),
                         [tensor], async_op)

    def _all_reduce_max(self, tensor):
        return self._all_reduce(tensor, False, op="NCCL_MAX")

    def _all_gather(self, out, tensor, async_op):
        n, dt = tensor.numel(), self._dtype(tensor)
        return self._run(lambda s: self.comm.allGather(tensor.data_ptr(), out.data_ptr(), n, dt, s),
                         [out, tensor], async_op)

    def _reduce_scatter(self, out, tensor, async_op):
        n, dt, total = out.numel(), self._dtype(tensor), self.nccl.NCCL_SUM
        return self._run(
            lambda s: self.comm.reduceScatter(tensor.data_ptr(), out.data_ptr(), n, dt, total, s),
            [out, tensor], async_op)

    def _all_to_all(self, out, tensor):
        n, dt = tensor.numel() // self.size, self._dtype(tensor)
        step = n * tensor.element_size()

        def launch(s):
            self.nccl.groupStart()
            for peer in range(self.size):
                self.comm.send(tensor.data_ptr() + peer * step, n, dt, peer, s)
                self.comm.recv(out.data_ptr() + peer * step, n, dt, peer, s)
            self.nccl.groupEnd()

        return self._run(launch, [out, tensor], False)

    def _broadcast(self, tensor, src):
        ptr, n, dt = tensor.data_ptr(), tensor.numel(), self._dtype(tensor)
        return self._run(lambda s: self.comm.broadcast(ptr, ptr, n, dt, src, s), [tensor], False)

    def _scatter(self, out, chunks, src):
        n, dt = out.numel(), self._dtype(out)
        if self.rank == src:
            chunks = [c.contiguous() for c in chunks]

        def launch(s):
            self.nccl.groupStart()
            if self.rank == src:
                for peer, chunk in enumerate(chunks):
                    if peer != src:
                        self.comm.send(chunk.data_ptr(), n, dt, peer, s)
            else:
                self.comm.recv(out.data_ptr(), n, dt, src, s)
            self.nccl.groupEnd()

        self._run(launch, [out] + (chunks if self.rank == src else []), False)
        if self.rank == src:
            out.copy_(chunks[src])

    def abort(self) -> None:
        self.comm.abort()

    def close(self) -> None:
        self.comm.destroy()


def cupy_mesh(tp: int, dp: int, rank: int, tp_id: tuple, dp_id: tuple, device) -> DeviceMesh:
    """The (dp, tp) mesh of global ``rank`` over CuPy NCCL communicators made from the
    unique ids of its TP group and its DP group. Every rank calls it at the same time
    (creating a communicator waits for the whole group); both groups share the rank's
    communication stream."""
    device = torch.device(device)
    streams = Streams.for_device(device)
    tp_comm = CupyNcclCommunicator(tp_id, rank % tp, tp, "tp", device, streams.comm)
    dp_comm = CupyNcclCommunicator(dp_id, rank // tp, dp, "dp", device, streams.comm)
    mesh = DeviceMesh.from_communicators(tp_comm, dp_comm, device)
    mesh.streams = streams
    return mesh


def make_cupy_mesh(mesh: DeviceMesh) -> DeviceMesh:
    """A mesh of the same layout as ``mesh`` (a torch.distributed one) over CuPy NCCL
    communicators, the unique ids sent over ``mesh``'s groups. Collective."""
    import torch.distributed as dist

    ids = []
    for comm in (mesh.tp_comm, mesh.dp_comm):
        box = [unique_id() if comm.rank == 0 else None]
        dist.broadcast_object_list(box, src=comm.global_ranks[0], group=comm.group)
        ids.append(box[0])
    return cupy_mesh(mesh.tp_size, mesh.dp_size, mesh.rank, ids[0], ids[1], mesh.device)
