"""Sharded checkpoints of training state, readable at any tp.

A checkpoint is a directory::

    checkpoint.json                         the index (JSON; see below)
    rank-00000-of-00002.safetensors         TP rank 0's shards
    rank-00001-of-00002.safetensors         TP rank 1's shards

Each file holds one TP rank's local tensors: ``model/{param}``, the optimizer state
``optim/{param}/{key}`` (AdamW's exp_avg and exp_avg_sq have the parameter's layout;
scalars such as ``step`` are the same on every rank) and the RNG states
``rng/{name}``. Only DP rank 0 of each shard writes; the other DP ranks hold the same.
The index records the tp and dp sizes, each parameter's global shape, placement,
blocks and dtype (its :class:`~raytp.DTensor`, :func:`raytp.dtensor.of`), the optimizer's param groups,
the model config, the step, the data position, the user's extra state, and the
sha256 and size of every file, verified when a file is opened for loading.

Loading reshards: each rank reads, from the saved files, only the slices its own
parameters' layout needs (:mod:`raytp.checkpoint.lazy`), whatever tp saved them.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from raytp.checkpoint.files import (
    CheckpointError,
    pickle_files,
    read_json,
    refuse_pickle,
    write_json,
    write_safetensors,
)
from raytp.dtensor import DTensor, named_dtensors
from raytp.placement import Layout, Replicate, Shard

FORMAT, VERSION = "raytp-checkpoint", 1
INDEX_NAME = "checkpoint.json"


def shard_file(tp_rank: int, tp_size: int) -> str:
    return f"rank-{tp_rank:05d}-of-{tp_size:05d}.safetensors"


def layout_json(tensor: DTensor) -> dict[str, Any]:
    """The layout of a parameter (viewed as a DTensor) as the index records it."""
    record: dict[str, Any] = {"dtype": str(tensor.dtype).removeprefix("torch."),
                              "global_shape": list(tensor.global_shape)}
    if isinstance(tensor.placement, Replicate):
        return {**record, "placement": "replicate"}
    if not isinstance(tensor.placement, Shard):
        raise CheckpointError(f"a {tensor.placement} parameter cannot be saved: reduce it first")
    return {**record, "placement": "shard", "dim": tensor.placement.dim,
            "blocks": [list(b) for b in tensor.blocks]}


def layout_from_json(record: dict[str, Any], tp_size: int) -> Layout:
    """The layout over the saving run's ``tp_size`` ranks that :func:`layout_json` recorded."""
    shape = torch.Size(record["global_shape"])
    if record["placement"] == "replicate":
        return Layout(Replicate(), shape, tp_size)
    blocks = tuple(tuple(b) for b in record["blocks"])
    return Layout(Shard(record["dim"]), shape, tp_size, blocks)


def _config_json(model: nn.Module) -> dict[str, Any] | None:
    config = getattr(model, "config", None)
    if config is None or not dataclasses.is_dataclass(config):
        return None
    return {"class": type(config).__name__, "fields": dataclasses.asdict(config)}


def _jsonable(value):
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, (tuple, list)):
        return [_jsonable(v) for v in value]
    return value


def _named_optimizer_params(model: nn.Module, optimizer) -> list[tuple[str, torch.Tensor]]:
    names = {id(p): n for n, p in model.named_parameters()}
    return [(names[id(p)], p) for group in optimizer.param_groups for p in group["params"]]


def _optimizer_json(model: nn.Module, optimizer) -> dict[str, Any] | None:
    if optimizer is None:
        return None
    names = {id(p): n for n, p in model.named_parameters()}
    groups = [{**{k: _jsonable(v) for k, v in g.items() if k != "params"},
               "params": [names[id(p)] for p in g["params"]]} for g in optimizer.param_groups]
    state = {}
    for name, p in _named_optimizer_params(model, optimizer):
        for key, value in optimizer.state.get(p, {}).items():
            if not isinstance(value, torch.Tensor):
                raise CheckpointError(f"optimizer state {name}/{key} is a {type(value).__name__}, "
                                      "not a tensor")
            state.setdefault(name, {})[key] = "param" if value.shape == p.shape else "scalar"
    return {"class": type(optimizer).__name__, "param_groups": groups, "state": state}


def describe(model: nn.Module, optimizer, mesh) -> dict[str, Any]:
    """The index's description of the run (no file records, step or data position yet)."""
    return {"format": FORMAT, "version": VERSION, "tp": mesh.tp_size, "dp": mesh.dp_size,
            "model_config": _config_json(model),
            "params": {name: layout_json(t) for name, t in named_dtensors(model, mesh)},
            "optimizer": _optimizer_json(model, optimizer)}


def rank_tensors(model: nn.Module, optimizer, rng: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What this rank's file holds: its local parameters, optimizer state and RNG states."""
    tensors = {f"model/{name}": p.detach() for name, p in model.named_parameters()}
    if optimizer is not None:
        for name, p in _named_optimizer_params(model, optimizer):
            for key, value in optimizer.state.get(p, {}).items():
                tensors[f"optim/{name}/{key}"] = value.detach()
    tensors |= {f"rng/{name}": state for name, state in rng.items()}
    return tensors


def write_shard(directory: Path, model: nn.Module, optimizer, mesh,
                rng: dict[str, torch.Tensor]) -> dict[str, dict[str, Any]]:
    """Write this rank's file into ``directory`` if it is DP rank 0 (the other DP ranks
    hold the same shards); return ``{file name: {"sha256", "bytes"}}`` (empty elsewhere)."""
    if mesh.dp_rank != 0:
        return {}
    name = shard_file(mesh.tp_rank, mesh.tp_size)
    return {name: write_safetensors(Path(directory) / name, rank_tensors(model, optimizer, rng))}


def write_index(directory: Path, meta: dict[str, Any], files: dict[str, dict[str, Any]], *,
                data_position: int = 0, extra: dict[str, Any] | None = None) -> None:
    """Write ``checkpoint.json`` into ``directory``: ``meta`` (from :func:`describe`, with
    the step), the file records of every TP rank, the data position and ``extra``."""
    expected = {shard_file(r, meta["tp"]) for r in range(meta["tp"])}
    if set(files) != expected:
        raise CheckpointError(f"the ranks wrote {sorted(files)}; a tp={meta['tp']} checkpoint needs "
                              f"{sorted(expected)}")
    try:
        json.dumps(extra)
    except TypeError as e:
        raise ValueError(f"extra state must be JSON-able: {e}") from None
    index = {**meta, "data_position": int(data_position), "extra": extra or {}, "files": files}
    write_json(Path(directory) / INDEX_NAME, index)


def read_index(path: Path) -> dict[str, Any]:
    """The index of the checkpoint at ``path``, its format checked."""
    path = Path(path)
    if not (path / INDEX_NAME).is_file():
        refuse_pickle(pickle_files(path))
        aside = sorted(path.parent.glob(f"{path.name}.old-*"))
        hint = f"; a save was interrupted while swapping checkpoints: the previous one is {aside[-1]}" \
            if aside else ""
        raise CheckpointError(f"{path} is not a raytp checkpoint: {INDEX_NAME} is missing{hint}")
    index = read_json(path / INDEX_NAME)
    if index.get("format") != FORMAT or index.get("version") != VERSION:
        raise CheckpointError(f"{path}: not a {FORMAT} v{VERSION} checkpoint (format="
                              f"{index.get('format')!r}, version={index.get('version')!r})")
    return index
