"""The (dp, tp) grid of ranks and its communicators.

Global rank ``r`` sits at ``dp_rank = r // tp``, ``tp_rank = r % tp``: a TP group is
``tp`` consecutive ranks (one node, when ranks are ordered by node), and a DP group
is the ranks holding the same shard in every TP group.
"""

from __future__ import annotations

import datetime
import logging
import os

import torch
import torch.distributed as dist

from raytp.comm import Communicator, TorchCommunicator
from raytp.comm.backends import get_backend

log = logging.getLogger(__name__)


class DeviceMesh:
    """The TP and DP groups of this rank.

    ``DeviceMesh(tp=2, dp=1)`` is built inside an initialized torch.distributed world
    of exactly ``tp * dp`` ranks, and every rank must build it (group creation is a
    collective). :meth:`from_communicators` wraps communicators made elsewhere (the
    CuPy NCCL backend).
    """

    def __init__(self, tp: int, dp: int = 1, *, device: torch.device | str | None = None):
        _check_sizes(tp, dp)
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError(
                "DeviceMesh needs an initialized torch.distributed world: call "
                "raytp.init_distributed() (under torchrun) or use raytp.TPCluster"
            )
        world = dist.get_world_size()
        if world != tp * dp:
            raise ValueError(f"world size {world} != tp*dp = {tp}*{dp} = {tp * dp}")
        device = torch.device(device) if device is not None else _default_device()
        rank = dist.get_rank()
        tp_group = dp_group = None
        # every rank creates every group, in the same order
        for d in range(dp):
            group = dist.new_group([d * tp + t for t in range(tp)])
            if d == rank // tp:
                tp_group = group
        for t in range(tp):
            group = dist.new_group([d * tp + t for d in range(dp)])
            if t == rank % tp:
                dp_group = group
        self._init(TorchCommunicator(tp_group, "tp", device),
                   TorchCommunicator(dp_group, "dp", device), device, rank)

    @classmethod
    def from_communicators(cls, tp_comm: Communicator, dp_comm: Communicator,
                           device: torch.device | str) -> DeviceMesh:
        mesh = cls.__new__(cls)
        mesh._init(tp_comm, dp_comm, torch.device(device),
                   dp_comm.rank * tp_comm.size + tp_comm.rank)
        return mesh

    def _init(self, tp_comm, dp_comm, device, rank):
        from raytp.streams import Streams

        self.tp_comm, self.dp_comm = tp_comm, dp_comm
        self.device = device
        self.rank = rank
        self.streams = Streams.for_device(device)  # compute, communication and data streams
        self._torch_mesh = None

    @property
    def tp_rank(self) -> int:
        return self.tp_comm.rank

    @property
    def tp_size(self) -> int:
        return self.tp_comm.size

    @property
    def dp_rank(self) -> int:
        return self.dp_comm.rank

    @property
    def dp_size(self) -> int:
        return self.dp_comm.size

    @property
    def tp_group(self) -> dist.ProcessGroup:
        return self._group(self.tp_comm)

    @property
    def dp_group(self) -> dist.ProcessGroup:
        return self._group(self.dp_comm)

    def torch_mesh(self):
        """The TP group as a 1-D ``torch.distributed.device_mesh.DeviceMesh``."""
        if self._torch_mesh is None:
            from torch.distributed.device_mesh import DeviceMesh as TorchDeviceMesh

            self._torch_mesh = TorchDeviceMesh.from_group(
                self.tp_group, self.device.type, mesh_dim_names=("tp",)
            )
        return self._torch_mesh

    @staticmethod
    def _group(comm: Communicator) -> dist.ProcessGroup:
        if not isinstance(comm, TorchCommunicator):
            raise TypeError(f"{comm!r} is not a torch.distributed group")
        return comm.group

    def __repr__(self):
        return (f"DeviceMesh(rank={self.rank}, tp={self.tp_rank}/{self.tp_size}, "
                f"dp={self.dp_rank}/{self.dp_size}, device={self.device})")


def _check_sizes(tp: int, dp: int) -> None:
    for name, value in (("tp", tp), ("dp", dp)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}={value!r} must be a positive integer")


def _default_device() -> torch.device:
    if "nccl" in str(dist.get_backend()).lower() and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def init_distributed(backend: str = "auto", timeout_s: float = 300.0) -> None:
    """Initialize torch.distributed from ``torchrun``'s environment.

    ``backend="auto"`` is the torch backend's choice (:mod:`raytp.comm.backends`): NCCL
    and the GPU ``LOCAL_RANK`` when CUDA is available, gloo otherwise; any other value
    is a torch.distributed backend name. Does nothing if the world is already initialized.
    """
    if dist.is_initialized():
        return
    missing = [k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise RuntimeError(f"init_distributed() needs torchrun's environment; missing {missing}")
    if backend == "auto":
        backend = get_backend("torch").process_group_backend("cuda" if torch.cuda.is_available() else "cpu")
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    log.info("rank %d of %d joined with %s", dist.get_rank(), dist.get_world_size(), backend)
