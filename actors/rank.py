"""The Ray process of one rank. A plain class: the driver applies ``ray.remote`` with
the resources it needs. It sets the device, joins the process groups, builds the
model shard through the core, and exposes the phases. No math lives here."""

from __future__ import annotations

import datetime
import logging
import os
import socket
import sys
import time
from typing import Any

import torch
import torch.distributed as dist

import raytp
from raytp.engine import RankEngine
from raytp.metrics import count_params

log = logging.getLogger("raytp.rank")


class _RankFilter(logging.Filter):
    def __init__(self, rank: int):
        super().__init__()
        self.rank = rank

    def filter(self, record):
        record.rank = self.rank
        return True


class RankActor:
    """One rank: its device, its process groups, its model shard and optimizer."""

    def __init__(self, dp_index: int, slot: int, log_level: int = logging.INFO):
        self.rank: int | None = None
        self.dp_index, self.slot = dp_index, slot
        self.mesh: raytp.DeviceMesh | None = None
        self.engine: RankEngine | None = None
        self._filter = _RankFilter(f"? (group {dp_index}, slot {slot})")
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("[rank %(rank)s] %(levelname)s %(name)s: %(message)s"))
        handler.addFilter(self._filter)
        logger = logging.getLogger("raytp")
        logger.handlers[:] = [handler]
        logger.setLevel(log_level)
        logger.propagate = False

    def __repr__(self):  # Ray prefixes this actor's log lines with it
        return f"RankActor(dp group {self.dp_index}, slot {self.slot})"

    def node_info(self) -> dict[str, Any]:
        import ray

        return {
            "node_id": ray.get_runtime_context().get_node_id(),
            "ip": ray.util.get_node_ip_address(),
            "gpu_ids": [int(g) for g in ray.get_gpu_ids()],
            "pid": os.getpid(),
            "hostname": socket.gethostname(),
        }

    def free_port(self) -> int:
        with socket.socket() as s:
            s.bind(("", 0))
            return s.getsockname()[1]

    def join(self, rank: int, world_size: int, tp: int, dp: int, master: tuple[str, int],
             device: str, timeout_s: float) -> str:
        """Join the world as ``rank`` and build the mesh; returns this rank's device."""
        self.rank = self._filter.rank = rank
        if device == "cuda":
            torch.cuda.set_device(0)  # Ray's CUDA_VISIBLE_DEVICES shows this actor its GPU only
        backend = "nccl" if device == "cuda" else "gloo"
        addr, port = master
        dist.init_process_group(backend, init_method=f"tcp://{addr}:{port}", rank=rank,
                                world_size=world_size, timeout=datetime.timedelta(seconds=timeout_s))
        self.mesh = raytp.DeviceMesh(tp=tp, dp=dp)
        log.info("joined: %s", self.mesh)
        return str(self.mesh.device)

    def nccl_unique_id(self) -> tuple:
        """A CuPy NCCL unique id, made here for a group this rank leads."""
        from raytp.comm.cupy_backend import unique_id

        return unique_id()

    def join_cupy(self, rank: int, tp: int, dp: int, tp_id: tuple, dp_id: tuple) -> str:
        """Join as ``rank`` through CuPy NCCL communicators made from the ids the driver
        handed out; no torch.distributed world and no TCP rendezvous."""
        from raytp.comm.cupy_backend import cupy_mesh

        self.rank = self._filter.rank = rank
        torch.cuda.set_device(0)
        self.mesh = cupy_mesh(tp, dp, rank, tp_id, dp_id, torch.device("cuda", 0))
        log.info("joined over CuPy NCCL: %s", self.mesh)
        return str(self.mesh.device)

    def build(self, model, plan, loss_fn, optimizer, seed: int, max_grad_norm,
              overlap: bool | None = None) -> dict[str, Any]:
        """Build the model shard from a raytp model config or a zero-argument factory."""
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
            raytp.nn.set_overlap(module, overlap)
        self.engine = RankEngine(self.mesh, module, optimizer.build(module.parameters()), loss_fn,
                                 max_grad_norm=max_grad_norm)
        local = sum(p.numel() * p.element_size() for p in module.parameters())
        return {"param_bytes": local, "params": count_params(module)}

    def _engine(self) -> RankEngine:
        if self.engine is None:
            raise RuntimeError("no model on this rank yet: call cluster.build(...) first")
        return self.engine

    def forward(self, batch, batch_id=None):
        return self._engine().forward(batch, batch_id)

    def backward(self):
        return self._engine().backward()

    def step(self):
        return self._engine().step()

    def train_step(self, batch, batch_id=None, next_batch=None, next_id=None):
        return self._engine().train_step(batch, batch_id, next_batch, next_id)

    def evaluate(self, batch):
        return self._engine().evaluate(batch)

    def loop_train_steps(self, batch, steps: int) -> float:
        """``steps`` training steps on one batch inside this actor, with no driver in the
        loop; returns their wall time in seconds (the control-plane baseline)."""
        engine = self._engine()
        start = time.perf_counter()
        for _ in range(steps):
            engine.train_step(batch)
        return time.perf_counter() - start

    def call(self, fn, *args):
        """``fn(actor, *args)`` on this rank: the actor's mesh, engine and model are there."""
        return fn(self, *args)

    def shutdown(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()
        for comm in (getattr(self.mesh, "tp_comm", None), getattr(self.mesh, "dp_comm", None)):
            if hasattr(comm, "close"):
                comm.close()

    # -- checkpoints: the core does the work (raytp.checkpoint, raytp.models.hf_export) --

    def save(self, directory: str) -> dict[str, Any]:
        """Write this rank's shards into ``directory`` (see ``RankEngine.save_shard``)."""
        return self._engine().save_shard(directory)

    def load(self, path: str) -> dict[str, Any]:
        """Load a checkpoint saved at any tp into this rank's model and optimizer."""
        return self._engine().load_checkpoint(path)

    def export_hf(self, directory: str) -> bool:
        """Write the model as a Hugging Face checkpoint (collective; rank 0 writes)."""
        return self._engine().export_hf(directory)
