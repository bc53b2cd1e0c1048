"""The Ray process of one rank. A plain class: the driver applies ``ray.remote`` with
the resources it needs. It sets the device, joins the process groups, builds the
model shard through the core, and exposes the phases. No math lives here."""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import socket
import sys
import time
from typing import Any

import torch
import torch.distributed as dist

import raytp
from actors.telemetry import RankTelemetry
from raytp import tracing
from raytp.comm.backends import Backend
from raytp.engine import RankEngine
from raytp.metrics import count_params
from raytp.nn.tuning import apply_overlap
from raytp.validate import batch_checker

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


def _tracked(method):
    """Record which method the rank is running, for :meth:`RankActor.where`."""

    @functools.wraps(method)
    def run(self, *args, **kwargs):
        self.current = method.__name__
        try:
            return method(self, *args, **kwargs)
        finally:
            self.current = None

    return run


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

    @_tracked
    def build(self, model, plan, loss_fn, optimizer, seed: int, max_grad_norm,
              overlap: bool | str | None = None, on_nan: str = "raise") -> dict[str, Any]:
        """Build the model shard from a raytp model config or a zero-argument factory.
        Returns its sizes and what checks its batches on the driver
        (:func:`raytp.validate.batch_checker`)."""
        if self.mesh is None:
            raise RuntimeError("build() before the rank joined its group")
        torch.manual_seed(seed)  # the same on every rank: each then keeps its slice
        if hasattr(model, "build"):
            module = model.build(self.mesh, device=self.mesh.device)
        else:
            module = model()
            if not isinstance(module, torch.nn.Module):
                raise TypeError(f"the model factory returned {type(module).__name__}, not an nn.Module")
            module = module.to(self.mesh.device)
            if plan is not None:
                module = raytp.parallelize(module, self.mesh, plan)
        if overlap is not None:
            apply_overlap(module, overlap)
        tracing.tag_submodules(module)  # collectives carry the name of the layer issuing them
        self.built_at = time.time()
        self.engine = RankEngine(self.mesh, module, optimizer.build(module.parameters()), loss_fn,
                                 max_grad_norm=max_grad_norm, on_nan=on_nan)
        local = sum(p.numel() * p.element_size() for p in module.parameters())
        return {"param_bytes": local, "params": count_params(module),
                "batch_checker": batch_checker(module, loss_fn)}

    def _engine(self) -> RankEngine:
        if self.engine is None:
            raise RuntimeError("no model on this rank yet: call cluster.build(...) first")
        return self.engine

    @_tracked
    def forward(self, batch, batch_id=None):
        return self._engine().forward(batch, batch_id)

    @_tracked
    def backward(self):
        return self._engine().backward()

    @_tracked
    def step(self):
        return self._exported(self._engine().step())

    @_tracked
    def train_step(self, batch, batch_id=None, next_batch=None, next_id=None):
        return self._exported(self._engine().train_step(batch, batch_id, next_batch, next_id))

    def _exported(self, metrics: dict[str, Any]) -> dict[str, Any]:
        """Record a step's metrics through Ray's metrics API (see actors.telemetry)."""
        if self._telemetry is None:
            self._telemetry = RankTelemetry(self.rank)
        self._telemetry.record(metrics)
        return metrics

    @_tracked
    def evaluate(self, batch):
        return self._engine().evaluate(batch)

    @_tracked
    def loop_train_steps(self, batch, steps: int) -> float:
        """``steps`` training steps on one batch inside this actor, with no driver in the
        loop; returns their wall time in seconds (the control-plane baseline)."""
        engine = self._engine()
        start = time.perf_counter()
        for _ in range(steps):
            engine.train_step(batch)
        return time.perf_counter() - start

    @_tracked
    def call(self, fn, *args):
        """``fn(actor, *args)`` on this rank: the actor's mesh, engine and model are there."""
        return fn(self, *args)

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

    # -- checkpoints: the core does the work (raytp.checkpoint, raytp.models.hf_export) --

    @_tracked
    def save(self, directory: str) -> dict[str, Any]:
        """Write this rank's shards into ``directory`` (see ``RankEngine.save_shard``)."""
        return self._engine().save_shard(directory)

    @_tracked
    def load(self, path: str) -> dict[str, Any]:
        """Load a checkpoint saved at any tp into this rank's model and optimizer."""
        return self._engine().load_checkpoint(path)

    @_tracked
    def export_hf(self, directory: str) -> bool:
        """Write the model as a Hugging Face checkpoint (collective; rank 0 writes)."""
        return self._engine().export_hf(directory)
