"""The Ray process of one rank. A plain class: the driver applies ``ray.remote`` with
the resources it needs. It sets the device, joins the process groups, builds its
:class:`~raytp.engine.RankEngine` through the core (:func:`raytp.engine.build_engine`),
and runs the engine's methods through one verb, :meth:`RankActor.execute`. No math
lives here."""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

import raytp
from actors.telemetry import RankTelemetry
from raytp import tracing
from raytp.comm.backends import Backend
from raytp.engine import BuildSpec, RankEngine, build_engine, describe

log = logging.getLogger("raytp.rank")


class _RankFilter(logging.Filter):
    def __init__(self, rank: int):
        super().__init__()
        self.rank = rank

    def filter(self, record):
        record.rank = self.rank
        return True


def _rank_log_handler(rank_filter: logging.Filter, log_level: int) -> logging.Handler:
    """Every log line of this process, raytp's, Ray's or the user's model code's, goes to
    stderr as ``[rank N] LEVEL logger: message``. raytp's and actors' loggers log at
    ``log_level``; the rest at WARNING, as Python's default."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("[rank %(rank)s] %(levelname)s %(name)s: %(message)s"))
    handler.addFilter(rank_filter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)
    for name in ("raytp", "actors"):
        logger = logging.getLogger(name)
        logger.handlers[:] = []
        logger.setLevel(log_level)
        logger.propagate = True
    return handler


def _rename_in_ray_logs(name: str) -> None:
    """Have Ray prefix this actor's printed lines with ``name`` from now on: its log
    monitor takes a line that starts with the actor-name marker as the new name (the
    same line Ray writes itself after ``__init__``)."""
    try:
        from ray._private.ray_constants import LOG_PREFIX_ACTOR_NAME
    except ImportError:  # another Ray: the prefix keeps the name of __init__
        return
    for stream in (sys.stdout, sys.stderr):
        print(f"{LOG_PREFIX_ACTOR_NAME}{name}", file=stream, flush=True)


STEPS = ("step", "train_step")  # engine phases whose results are a step's metrics


class RankActor:
    """One rank: its device, its process groups, its model shard and optimizer."""

    def __init__(self, dp_index: int, slot: int, log_level: int = logging.INFO):
        self.rank: int | None = None
        self.current: str | None = None  # the method running now (see where())
        self.built_at: float | None = None  # time.time() of the last build()
        self.dp_index, self.slot = dp_index, slot
        self.mesh: raytp.DeviceMesh | None = None
        self.engine: RankEngine | None = None
        self._telemetry: RankTelemetry | None = None
        self._filter = _RankFilter(f"? (group {dp_index}, slot {slot})")
        self.log_handler = _rank_log_handler(self._filter, log_level)

    def __repr__(self):  # Ray prefixes this actor's printed lines with it
        if self.rank is None:
            return f"RankActor(dp group {self.dp_index}, slot {self.slot})"
        return f"RankActor(rank {self.rank})"

    def _set_rank(self, rank: int) -> None:
        self.rank = self._filter.rank = rank
        _rename_in_ray_logs(repr(self))

    def node_info(self) -> dict[str, Any]:
        import ray

        return {
            "node_id": ray.get_runtime_context().get_node_id(),
            "ip": ray.util.get_node_ip_address(),
            "gpu_ids": [int(g) for g in ray.get_gpu_ids()],
            "pid": os.getpid(),
            "hostname": socket.gethostname(),
        }

    def rendezvous_info(self, backend: Backend, key) -> Any:
        """What this rank, the leader of ``key`` in ``backend``'s rendezvous, makes for it
        (see :mod:`raytp.comm.backends`), with this node's address for the others."""
        import ray

        return backend.leader_info(key, ray.util.get_node_ip_address())

    def join(self, backend: Backend, rank: int, tp: int, dp: int, device: str, info,
             timeout_s: float) -> str:
        """Join as ``rank`` through ``backend`` with ``info`` (its part of the rendezvous)
        and keep the mesh; returns this rank's device."""
        self._set_rank(rank)
        # Ray's CUDA_VISIBLE_DEVICES shows this actor its GPU only
        where = torch.device("cuda", 0) if device == "cuda" else torch.device("cpu")
        self.mesh = backend.join(rank, tp, dp, where, info, timeout_s)
        log.info("joined over %s: %s", backend.name, self.mesh)
        return str(self.mesh.device)

    def build(self, spec: BuildSpec) -> dict[str, Any]:
        """Build this rank as ``spec`` says (:func:`raytp.engine.build_engine`); returns
        its sizes and what checks its batches on the driver."""
        if self.mesh is None:
            raise RuntimeError("build() before the rank joined its group")
        self.current = "build"
        try:
            self.engine = build_engine(self.mesh, spec)
            self.built_at = time.time()
            return describe(self.engine, spec)
        finally:
            self.current = None

    def execute(self, method: str | Callable, *args, **kwargs) -> Any:
        """Run the engine's ``method`` (a name), or ``method(actor, *args, **kwargs)`` (a
        function), on this rank: the one verb every driver phase goes through. The method
        running is recorded for :meth:`where`; a step's metrics are also exported through
        Ray's metrics API (see :mod:`actors.telemetry`)."""
        name = method if isinstance(method, str) else getattr(method, "__name__", "call")
        self.current = name
        try:
            if not isinstance(method, str):
                return method(self, *args, **kwargs)
            if self.engine is None:
                raise RuntimeError("no model on this rank yet: call cluster.build(...) first")
            if method.startswith("_") or not callable(getattr(self.engine, method, None)):
                raise AttributeError(f"the rank engine has no phase {method!r}")
            result = getattr(self.engine, method)(*args, **kwargs)
            if method in STEPS:
                self._export(result)
            return result
        finally:
            self.current = None

    def _export(self, metrics: dict[str, Any]) -> None:
        if self._telemetry is None:
            self._telemetry = RankTelemetry(self.rank)
        self._telemetry.record(metrics)

    # -- the "control" concurrency group: answered from its own thread during a phase --

    def ping(self) -> bool:
        """The health monitor's probe: an answer means the actor is alive."""
        return True

    def where(self) -> dict[str, Any]:
        """The method this rank is running and the last collective it issued on each group."""
        engine = self.engine
        return {"rank": self.rank, "phase": self.current, "pid": os.getpid(), "built_at": self.built_at,
                "engine_phase": engine.phase if engine else None,
                "step": engine.step_count if engine else None,
                "collectives": tracing.where(self.mesh)}

    def abort(self) -> bool:
        """Abort this rank's communicators so that a collective stuck on a lost peer
        returns; the driver ends the actor next."""
        comms = [getattr(self.mesh, "tp_comm", None), getattr(self.mesh, "dp_comm", None)]
        for comm in comms:
            if hasattr(comm, "abort"):
                with contextlib.suppress(Exception):
                    comm.abort()
        return True

    def shutdown(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()
        for comm in (getattr(self.mesh, "tp_comm", None), getattr(self.mesh, "dp_comm", None)):
            if hasattr(comm, "close"):
                comm.close()
