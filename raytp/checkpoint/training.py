"""Saving and loading a rank's training state: the model shard, the optimizer state,
the step, the RNG states and the data position.

:func:`save_rank` and :func:`load_rank` are what each rank does (the driver calls them
through the rank actors and writes the index itself); :func:`save` and :func:`load`
do the whole job on the ranks alone (``torchrun``), with a few collectives to agree
on the staging directory and to wait for the files.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from raytp import zero
from raytp.checkpoint.files import commit_dir, file_record, staging_dir
from raytp.checkpoint.restore import SavedShards, check_model, load_optimizer_, load_params_, read_rng
from raytp.checkpoint.sharded import describe, read_index, shard_file, write_index, write_shard
from raytp.mesh import DeviceMesh
from raytp.random import RNGTracker, rng_state, set_rng_state

log = logging.getLogger(__name__)


def _tracker(model: nn.Module) -> RNGTracker | None:
    rng = getattr(model, "rng", None)
    return rng if isinstance(rng, RNGTracker) else None


def save_rank(directory: str | Path, model: nn.Module, optimizer, mesh: DeviceMesh, *,
              step: int) -> dict[str, Any]:
    """Write this rank's file into ``directory`` (DP rank 0 only). Returns ``{"files":
    {name: record}, "meta": ...}``; ``meta``, the index's description of the run with
    the step, comes from global rank 0 only (None elsewhere). No collectives, except the
    DP all-gathers of a DP-sharded optimizer's state (every rank calls it)."""
    rng = rng_state(_tracker(model), mesh.device)
    optimizer = zero.unsharded(optimizer, model)  # a DP-sharded optimizer's state gathered (collective)
    files = write_shard(Path(directory), model, optimizer, mesh, rng)
    meta = {**describe(model, optimizer, mesh), "step": int(step)} if mesh.rank == 0 else None
    return {"files": files, "meta": meta}


def load_rank(path: str | Path, model: nn.Module, optimizer, mesh: DeviceMesh) -> dict[str, Any]:
    """Load the checkpoint at ``path`` into this rank's model and optimizer (resharding
    from whatever tp saved it) and restore the RNG states. Returns ``{"step",
    "data_position", "extra"}``. No collectives; every rank calls it."""
    index = read_index(Path(path))
    check_model(index, model)
    with SavedShards(Path(path), index) as shards:
        load_params_(shards, model, mesh)
        if optimizer is not None:
            target = zero.unsharded_target(optimizer, model)
            load_optimizer_(shards, model, target, mesh)
            zero.finish_load(optimizer, target, model)  # a DP-sharded optimizer keeps its slice
        rng, own = read_rng(shards, mesh.tp_rank, mesh.tp_size)
    set_rng_state(rng, _tracker(model), mesh.device, same_tp_rank=own)
    log.info("loaded %s (saved at tp=%d) at tp rank %d/%d", path, index["tp"], mesh.tp_rank, mesh.tp_size)
    return {"step": index["step"], "data_position": index["data_position"], "extra": index["extra"]}


def _world_barrier(mesh: DeviceMesh) -> None:
    """Every rank of the (dp, tp) grid has arrived: TP groups first, then DP groups."""
    mesh.tp_comm.barrier()
    mesh.dp_comm.barrier()
    mesh.tp_comm.barrier()


def _agree_nonce(mesh: DeviceMesh) -> str:
    """A random name drawn on rank 0 (from the OS, not torch: the training RNG is untouched)."""
    nonce = torch.tensor([int.from_bytes(os.urandom(6), "little")], dtype=torch.int64, device=mesh.device)
    mesh.dp_comm.broadcast(nonce, src=0)
    mesh.tp_comm.broadcast(nonce, src=0)
    return f"{int(nonce.item()):012x}"


def save(path: str | Path, model: nn.Module, optimizer, mesh: DeviceMesh, *, step: int = 0,
         data_position: int = 0, extra: dict | None = None) -> Path:
    """Save a sharded checkpoint to ``path`` from every rank (a filesystem they share).
    Written into ``path.tmp-<nonce>/`` and renamed into place when complete; a previous
    checkpoint at ``path`` stays intact until then. Collectives: two broadcasts and a few
    barriers."""
    path = Path(path).resolve()
    staging = staging_dir(path, _agree_nonce(mesh))
    if mesh.rank == 0:
        staging.mkdir(parents=True)
    _world_barrier(mesh)
    mine = save_rank(staging, model, optimizer, mesh, step=step)
    _world_barrier(mesh)
    if mesh.rank == 0:  # the other writers' files are on the shared filesystem: hash them here
        names = [shard_file(r, mesh.tp_size) for r in range(mesh.tp_size)]
        files = {name: file_record(staging / name) for name in names}
        write_index(staging, mine["meta"], files, data_position=data_position, extra=extra)
        commit_dir(staging, path)
    _world_barrier(mesh)
    return path


def load(path: str | Path, model: nn.Module, optimizer, mesh: DeviceMesh) -> dict[str, Any]:
    """:func:`load_rank` (no collectives)."""
    return load_rank(path, model, optimizer, mesh)
