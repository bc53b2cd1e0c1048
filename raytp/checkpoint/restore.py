"""Loading a sharded checkpoint into a model of any tp: each rank reads, from the saved
rank files, only the slices of its own parameters, each viewed as a DTensor
(:func:`raytp.dtensor.of`)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
from torch import nn

from raytp.checkpoint.files import CheckpointError, SafetensorsFiles, verify_file
from raytp.checkpoint.lazy import LazyTensor, Piece, file_piece, read_local, shard_dim
from raytp.checkpoint.sharded import _config_json, _named_optimizer_params, layout_from_json, shard_file
from raytp.dtensor import DTensor, named_dtensors, of
from raytp.mesh import DeviceMesh
from raytp.placement import Replicate

_MAY_DIFFER = ("sequence_parallel", "dropout", "dtype")  # config fields a checkpoint may load across


class SavedShards:
    """The rank files of a checkpoint, each verified against the index (sha256 and size)
    and opened on first use, so a rank hashes and opens only the files it reads."""

    def __init__(self, path: Path, index: dict[str, Any]):
        self.path, self.index = Path(path), index
        self._files: dict[int, SafetensorsFiles] = {}

    def rank(self, tp_rank: int) -> SafetensorsFiles:
        if tp_rank not in self._files:
            name = shard_file(tp_rank, self.index["tp"])
            if name not in self.index["files"]:
                raise CheckpointError(f"{self.path}: the index lists no file {name}")
            verify_file(self.path / name, self.index["files"][name])
            self._files[tp_rank] = SafetensorsFiles.of_files([self.path / name])
        return self._files[tp_rank]

    def close(self) -> None:
        for files in self._files.values():
            files.close()

    def __enter__(self) -> SavedShards:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def saved_tensor(shards: SavedShards, record: dict[str, Any], key: str, shape: tuple[int, ...],
                 dim: int, dtype: torch.dtype) -> LazyTensor:
    """The full tensor ``key``, saved with ``record``'s layout, as a :class:`LazyTensor` of
    ``shape`` along ``dim``. Saved rows past ``shape`` (a vocabulary padded for another
    tp) must be zeros; rows past the saved ones are zeros."""
    saved = layout_from_json(record, shards.index["tp"])
    if isinstance(saved.placement, Replicate):
        pieces = [file_piece(shards.rank(0), key, dim)]
    elif saved.placement.dim != dim:
        raise CheckpointError(f"{key}: saved sharded on dim {saved.placement.dim}; the parameter is "
                              f"sharded on dim {dim}")
    else:
        pieces = [file_piece(shards.rank(r), key, dim, start=start, length=length)
                  for r, start, length in saved.full_parts()]
    excess = int(saved.global_shape[dim]) - shape[dim]
    if excess > 0:
        full = LazyTensor(tuple(saved.global_shape), dim, pieces, dtype)
        if full.read(shape[dim], shape[dim] + excess).count_nonzero():
            raise CheckpointError(f"{key}: saved with {saved.global_shape[dim]} entries along dim {dim}; "
                                  f"the parameter has {shape[dim]}, and the extra ones are not padding")
        pieces = _truncate(pieces, shape[dim])
    return LazyTensor(shape, dim, pieces, dtype)


def _truncate(pieces: list[Piece], length: int) -> list[Piece]:
    kept, position = [], 0
    for piece in pieces:
        if position >= length:
            break
        kept.append(dataclasses.replace(piece, length=min(piece.length, length - position)))
        position += piece.length
    return kept


def _read_like(shards: SavedShards, key: str, record: dict[str, Any], target: DTensor) -> torch.Tensor:
    """This rank's part, under ``target``'s layout, of the saved tensor ``key``."""
    layout = target.layout
    dim = shard_dim(layout)
    try:
        full = saved_tensor(shards, record, key, tuple(layout.global_shape), dim, target.dtype)
        return read_local(full, layout, target.mesh.tp_rank)
    except CheckpointError as e:
        raise CheckpointError(f"{key}: {e}") from None


def check_model(index: dict[str, Any], model: nn.Module) -> None:
    """Raise naming the difference unless ``model`` has the saved parameters and config
    (dtype, dropout and sequence parallelism may differ)."""
    names, saved = {n for n, _ in model.named_parameters()}, set(index["params"])
    if names != saved:
        raise CheckpointError(f"the model and the checkpoint differ: missing from the checkpoint "
                              f"{sorted(names - saved)[:5]}, not in the model {sorted(saved - names)[:5]}")
    mine, theirs = _config_json(model), index.get("model_config")
    if mine is None or theirs is None:
        return
    if mine["class"] != theirs["class"]:
        raise CheckpointError(f"the checkpoint holds a {theirs['class']}; the model is a {mine['class']}")
    differ = {k: (theirs["fields"].get(k), v) for k, v in mine["fields"].items()
              if k not in _MAY_DIFFER and theirs["fields"].get(k) != v}
    if differ:
        raise CheckpointError("the model's config differs from the checkpoint's: "
                              + ", ".join(f"{k}: saved {a!r}, model {b!r}" for k, (a, b) in differ.items()))


@torch.no_grad()
def load_params_(shards: SavedShards, model: nn.Module, mesh: DeviceMesh) -> None:
    """Copy into each parameter (through its DTensor view) its part of the saved one."""
    for name, view in named_dtensors(model, mesh):
        view.local.copy_(_read_like(shards, f"model/{name}", shards.index["params"][name], view))


def load_optimizer_(shards: SavedShards, model: nn.Module, optimizer, mesh: DeviceMesh) -> None:
    """Reshard the saved optimizer state onto this rank's parameters (state tensors of a
    parameter's shape take its layout; scalars come from rank 0's file) and restore the
    param groups' hyperparameters."""
    saved = shards.index["optimizer"]
    if saved is None or saved["class"] != type(optimizer).__name__:
        found = saved and saved["class"]
        raise CheckpointError(f"the checkpoint holds optimizer state of {found}; the optimizer is a "
                              f"{type(optimizer).__name__}")
    named = _named_optimizer_params(model, optimizer)
    state = {}
    for i, (name, p) in enumerate(named):
        entries = {}
        for key, layout in saved["state"].get(name, {}).items():
            full_key = f"optim/{name}/{key}"
            value = (_read_like(shards, full_key, shards.index["params"][name], of(p, mesh))
                     if layout == "param" else shards.rank(0).tensor(full_key))
            entries[key] = value.clone()  # safetensors may hand out views of the file's mapping
        if entries:
            state[i] = entries
    optimizer.load_state_dict({"state": state, "param_groups": _param_groups(saved, optimizer, named)})


def _param_groups(saved: dict[str, Any], optimizer, named) -> list[dict[str, Any]]:
    if len(saved["param_groups"]) != len(optimizer.param_groups):
        raise CheckpointError(f"the checkpoint's optimizer has {len(saved['param_groups'])} param groups; "
                              f"this one has {len(optimizer.param_groups)} (the spec's no_decay makes them: "
                              "no_decay='none' gives one group, as checkpoints saved without groups hold)")
    groups, start = [], 0
    for saved_group, group in zip(saved["param_groups"], optimizer.param_groups, strict=True):
        n = len(group["params"])
        names = [name for name, _ in named[start:start + n]]
        if saved_group["params"] != names:
            raise CheckpointError("the optimizer's param groups hold other parameters than the checkpoint's")
        hyper = {k: tuple(v) if k == "betas" else v for k, v in saved_group.items() if k != "params"}
        groups.append({**hyper, "params": list(range(start, start + n))})
        start += n
    return groups


def read_rng(shards: SavedShards, tp_rank: int, tp_size: int) -> tuple[dict[str, torch.Tensor], bool]:
    """The saved RNG states for this rank: its own TP rank's when tp is unchanged, else TP
    rank 0's; and whether they are its own."""
    same = shards.index["tp"] == tp_size
    files = shards.rank(tp_rank if same else 0)
    keys = [k for k in files.weight_map if k.startswith("rng/")]
    return {k.removeprefix("rng/"): files.tensor(k) for k in keys}, same
