"""Loading Hugging Face checkpoints into raytp models, each rank reading only its slices.

``from_pretrained(path, mesh)`` reads ``config.json`` and the ``*.safetensors`` weights
(one file, or shards listed in ``model.safetensors.index.json``), builds the raytp
model with storage for this rank's shards only, and fills each parameter from the
rows or columns of the checkpoint tensors it needs (``safe_open(...).get_slice``):
Q, K and V (or gate and up) are read as the blocks of one fused parameter, GPT-2's
Conv1D weights through their transpose, a padded vocabulary's extra rows are zeros.
A full tensor is never materialized on a rank. Pickle checkpoints (``*.bin``) are
refused: unpickling runs code from the file.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from raytp.checkpoint.files import (
    PICKLE_SUFFIXES,
    CheckpointError,
    SafetensorsFiles,
    read_json,
    refuse_pickle,
)
from raytp.checkpoint.lazy import LazyTensor, file_piece, read_local, shard_dim
from raytp.mesh import DeviceMesh
from raytp.models.bert import Bert
from raytp.models.families import Family, family_named, family_of
from raytp.models.gpt import GPT
from raytp.models.hf_config import config_from_hf
from raytp.models.hf_names import Source, bert_names, gpt2_names, llama_names  # noqa: F401 (re-exported)
from raytp.params import get_spec

log = logging.getLogger(__name__)

INDEX = "model.safetensors.index.json"


def hf_names(family: str | Family, config) -> dict[str, Source]:
    """raytp parameter name -> its :class:`Source`, keys relative to the base model."""
    return family_named(family).names(config.n_layers, getattr(config, "bias", True))


def open_hf_checkpoint(path: Path) -> SafetensorsFiles:
    """The safetensors weights at ``path`` (a directory or one file); refuses pickles."""
    if path.is_file():
        if path.suffix == ".safetensors":
            return SafetensorsFiles.of_files([path])
        refuse_pickle([path] if path.suffix in PICKLE_SUFFIXES else [])
        raise CheckpointError(f"{path} is not a safetensors file")
    if (path / INDEX).is_file():
        weight_map = read_json(path / INDEX)["weight_map"]
        return SafetensorsFiles({k: path / f for k, f in weight_map.items()})
    files = sorted(path.glob("*.safetensors"))
    if files:
        return SafetensorsFiles.of_files(files)
    refuse_pickle([p for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES])
    raise CheckpointError(f"{path} holds no *.safetensors weights")


def _prefix(files: SafetensorsFiles, family: Family) -> str:
    """Where the base model sits in the checkpoint: the prefix of the family's probe key."""
    probe = family.probe
    for key in files.weight_map:
        if key == probe or key.endswith("." + probe):
            return key[: len(key) - len(probe)]
    raise CheckpointError(f"no tensor named like {probe!r}: is this a {family.name} checkpoint?")


def _resolve(files: SafetensorsFiles, prefix: str, key: str) -> str:
    for candidate in (prefix + key, key):
        if candidate in files:
            return candidate
    raise CheckpointError(f"the checkpoint has no tensor {prefix + key!r}")


@torch.no_grad()
def load_hf_weights_(model: nn.Module, files: SafetensorsFiles, family: str | Family,
                     tp_rank: int) -> nn.Module:
    """Fill every parameter of ``model`` (a raytp GPT or Bert) with this rank's part of
    its checkpoint tensors, reading only that part."""
    family = family_named(family)
    names, prefix = hf_names(family, model.config), _prefix(files, family)
    for name, param in model.named_parameters():
        if name not in names:
            raise CheckpointError(f"no {family.name} checkpoint tensor maps to raytp parameter {name!r}")
        source, spec = names[name], get_spec(param)
        dim = shard_dim(spec)
        pieces = [file_piece(files, _resolve(files, prefix, key), dim, transposed=source.transposed)
                  for key in source.keys]
        shape = tuple(spec.global_shape) if spec is not None else tuple(param.shape)
        try:
            param.copy_(read_local(LazyTensor(shape, dim, pieces, param.dtype), spec, tp_rank))
        except (CheckpointError, RuntimeError) as e:
            raise CheckpointError(f"{name} <- {list(source.keys)}: {e}") from None
    return model


def from_pretrained(path: str | Path, mesh: DeviceMesh, *, device: torch.device | str | None = None,
                    dtype: str = "float32", **overrides) -> GPT | Bert:
    """This rank's shard of the Hugging Face model at ``path`` (a directory with
    ``config.json`` and safetensors weights), as a raytp :class:`GPT` (GPT-2, Llama) or
    :class:`Bert`. ``dtype`` is the parameters' dtype; ``overrides`` replace config
    fields (``sequence_parallel=True``, ``dropout=0.1``). Every rank calls it; no
    collectives. Raises ValueError for an unsupported architecture or a tp that does
    not divide the heads or the ffn size."""
    path = Path(path)
    directory = path if path.is_dir() else path.parent
    hf = read_json(directory / "config.json")
    family = family_of(hf)
    config = config_from_hf(hf, dtype, **overrides)
    config.check_tp(mesh.tp_size)
    with open_hf_checkpoint(path) as files:
        model = family.model_cls(config, mesh, device=device, init=False)
        load_hf_weights_(model, files, family, mesh.tp_rank)
    log.info("loaded %s (%s) at tp rank %d/%d", path, family.name, mesh.tp_rank, mesh.tp_size)
    return model


@dataclass(frozen=True)
class Pretrained:
    """A picklable recipe for ``cluster.build``: ``build(mesh, device)`` runs
    :func:`from_pretrained` on each rank. ``overrides`` are ``(field, value)`` pairs."""

    path: str
    dtype: str = "float32"
    overrides: tuple[tuple[str, object], ...] = ()

    def build(self, mesh: DeviceMesh, device: torch.device | str | None = None) -> GPT | Bert:
        return from_pretrained(self.path, mesh, device=device, dtype=self.dtype, **dict(self.overrides))

    def config(self):
        """The raytp config of the checkpoint (reads ``config.json``)."""
        path = Path(self.path)
        hf = read_json((path if path.is_dir() else path.parent) / "config.json")
        return config_from_hf(hf, self.dtype, **dict(self.overrides))


def pretrained(path: str | Path, *, dtype: str = "float32", **overrides) -> Pretrained:
    """``cluster.build(raytp.models.pretrained(path))`` loads the checkpoint on every rank."""
    return Pretrained(str(Path(path).resolve()), dtype, tuple(sorted(overrides.items())))
