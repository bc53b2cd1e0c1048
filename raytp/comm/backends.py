"""Collective backends by name: how the ranks meet, and the :class:`~raytp.mesh.DeviceMesh`
each rank joins.

A rendezvous runs in the same four steps for every backend, wherever the ranks live
(Ray actors, test processes):

1. ``leaders(tp, dp)`` names the ranks that make the rendezvous info: ``{key: rank}``.
2. Each of those ranks calls ``leader_info(key, host)`` in its own process; the results
   are small picklable values (torch: rank 0's host and a free port; cupy-nccl: an NCCL
   unique id for each TP group and each DP group, made on the group's first rank).
3. ``rank_info(rank, tp, dp, infos)`` picks out of ``{key: info}`` what one rank needs.
4. Every rank calls ``join(rank, tp, dp, device, info, timeout_s)`` at the same time
   (joining is collective) and gets its mesh.

Backends are registered by name (:func:`register_backend`) and looked up by
:func:`get_backend`; ``"auto"`` is the torch backend. A backend object is passed to the
ranks by value, so it must be picklable (a frozen dataclass is).
"""

from __future__ import annotations

import datetime
import socket
from collections.abc import Hashable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import torch
import torch.distributed as dist

if TYPE_CHECKING:
    from raytp.mesh import DeviceMesh


@runtime_checkable
class Backend(Protocol):
    """How ranks rendezvous and join (the steps in this module's docstring)."""

    name: str

    def check(self, device: str) -> None:
        """Raise ValueError when this backend cannot run on ``device`` ('auto', 'cuda'
        or 'cpu', as given to the cluster or as 'auto' resolved)."""

    def leaders(self, tp: int, dp: int) -> dict[Hashable, int]:
        """The ranks that make rendezvous info, by key."""

    def leader_info(self, key: Hashable, host: str) -> Any:
        """Made on the leader rank of ``key``; ``host`` is the address its node is
        reached at by the other ranks."""

    def rank_info(self, rank: int, tp: int, dp: int, infos: Mapping[Hashable, Any]) -> Any:
        """What global ``rank`` needs to join, out of every leader's info."""

    def join(self, rank: int, tp: int, dp: int, device: torch.device, info: Any,
             timeout_s: float) -> DeviceMesh:
        """Join as global ``rank`` of a ``tp x dp`` mesh on ``device``. Collective."""


def free_port() -> int:
    """A TCP port free on this node now."""
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


@dataclass(frozen=True)
class TorchBackend:
    """One torch.distributed world (NCCL on CUDA, gloo on CPU) made over TCP at rank 0's
    host and a port free there; the mesh's TP and DP groups are process groups of it."""

    name: str = "torch"

    def check(self, device: str) -> None:
        pass  # NCCL on GPUs, gloo on CPUs: it runs on every device

    def process_group_backend(self, device: torch.device | str) -> str:
        return "nccl" if torch.device(device).type == "cuda" else "gloo"

    def leaders(self, tp: int, dp: int) -> dict[Hashable, int]:
        return {"world": 0}

    def leader_info(self, key: Hashable, host: str) -> tuple[str, int]:
        return host, free_port()

    def rank_info(self, rank: int, tp: int, dp: int, infos: Mapping[Hashable, Any]) -> tuple[str, int]:
        return infos["world"]

    def join(self, rank: int, tp: int, dp: int, device: torch.device, info: tuple[str, int],
             timeout_s: float) -> DeviceMesh:
        from raytp.mesh import DeviceMesh

        device = torch.device(device)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        addr, port = info
        dist.init_process_group(self.process_group_backend(device), init_method=f"tcp://{addr}:{port}",
                                rank=rank, world_size=tp * dp,
                                timeout=datetime.timedelta(seconds=timeout_s))
        return DeviceMesh(tp=tp, dp=dp, device=device)


@dataclass(frozen=True)
class CupyNcclBackend:
    """NCCL communicators made through CuPy (:mod:`raytp.comm.cupy_backend`): the first
    rank of each TP group and of each DP group makes its unique id; no torch.distributed
    world and no TCP port."""

    name: str = "cupy-nccl"

    def check(self, device: str) -> None:
        if device == "cpu":
            raise ValueError("backend='cupy-nccl' is NCCL: it needs device='cuda' (or 'auto' on GPUs)")

    def leaders(self, tp: int, dp: int) -> dict[Hashable, int]:
        return {**{("tp", d): d * tp for d in range(dp)}, **{("dp", t): t for t in range(tp)}}

    def leader_info(self, key: Hashable, host: str) -> tuple:
        from raytp.comm.cupy_backend import unique_id

        return unique_id()

    def rank_info(self, rank: int, tp: int, dp: int, infos: Mapping[Hashable, Any]) -> tuple:
        return infos[("tp", rank // tp)], infos[("dp", rank % tp)]

    def join(self, rank: int, tp: int, dp: int, device: torch.device, info: tuple,
             timeout_s: float) -> DeviceMesh:
        from raytp.comm.cupy_backend import cupy_mesh

        torch.cuda.set_device(device)
        tp_id, dp_id = info
        return cupy_mesh(tp, dp, rank, tp_id, dp_id, device)


TORCH = TorchBackend()
_BUILT_IN = {"auto": TORCH, "torch": TORCH, "cupy-nccl": CupyNcclBackend()}
_REGISTRY: dict[str, Backend] = dict(_BUILT_IN)


def register_backend(name: str, backend: Backend) -> None:
    """Make ``backend`` available as ``TPCluster(backend=name)``. A name is registered once."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"a backend name must be a non-empty string, got {name!r}")
    if name in _REGISTRY:
        raise ValueError(f"backend {name!r} is already registered")
    missing = [m for m in ("name", "check", "leaders", "leader_info", "rank_info", "join")
               if not hasattr(backend, m)]
    if missing:
        raise TypeError(f"backend {name!r} ({type(backend).__name__}) lacks {missing}")
    _REGISTRY[name] = backend


def unregister_backend(name: str) -> None:
    """Forget a backend registered by :func:`register_backend` (the built-in ones stay)."""
    if name in _BUILT_IN:
        raise ValueError(f"backend {name!r} is built in; it stays registered")
    if name not in _REGISTRY:
        raise ValueError(f"backend={name!r} is not registered: one of {backend_names()}")
    del _REGISTRY[name]


def backend_names() -> tuple[str, ...]:
    """The registered names, built-in ones first."""
    return tuple(_REGISTRY)


def get_backend(name: str) -> Backend:
    """The backend registered as ``name`` (``"auto"``: torch)."""
    if not isinstance(name, str) or name not in _REGISTRY:
        raise ValueError(f"backend={name!r} must be one of {backend_names()}")
    return _REGISTRY[name]
