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
from raytp.models.gpt import GPT
from raytp.models.hf_config import config_from_hf, model_family
from raytp.params import get_spec

log = logging.getLogger(__name__)

INDEX = "model.safetensors.index.json"


@dataclass(frozen=True)
class Source:
    """The checkpoint tensors a raytp parameter's full tensor is made of: ``keys``
    concatenated along the parameter's shard dim, each transposed first when
    ``transposed`` (GPT-2's Conv1D stores (in, out))."""

    keys: tuple[str, ...]
    transposed: bool = False


def _s(*keys: str, t: bool = False) -> Source:
    return Source(keys, t)


def _pair(raytp: str, hf: str, t: bool = False, bias: bool = True) -> dict[str, Source]:
    """weight (and bias) of a linear or norm layer."""
    names = {f"{raytp}.weight": _s(f"{hf}.weight", t=t)}
    if bias:
        names[f"{raytp}.bias"] = _s(f"{hf}.bias")
    return names


def gpt2_names(n_layers: int, bias: bool = True) -> dict[str, Source]:
    names = {"embed.weight": _s("wte.weight"), "pos_embed.weight": _s("wpe.weight"), **_pair("norm", "ln_f")}
    for i in range(n_layers):
        r, h = f"layers.{i}", f"h.{i}"
        names |= {**_pair(f"{r}.attn_norm", f"{h}.ln_1"), **_pair(f"{r}.mlp_norm", f"{h}.ln_2"),
                  **_pair(f"{r}.attn.qkv", f"{h}.attn.c_attn", t=True),
                  **_pair(f"{r}.attn.proj", f"{h}.attn.c_proj", t=True),
                  **_pair(f"{r}.mlp.fc_in", f"{h}.mlp.c_fc", t=True),
                  **_pair(f"{r}.mlp.fc_out", f"{h}.mlp.c_proj", t=True)}
    return names


def llama_names(n_layers: int, bias: bool = False) -> dict[str, Source]:
    names = {"embed.weight": _s("embed_tokens.weight"), "norm.weight": _s("norm.weight"),
             "lm_head.weight": _s("lm_head.weight")}
    for i in range(n_layers):
        r, h = f"layers.{i}", f"layers.{i}"
        qkv = [f"{h}.self_attn.{p}_proj" for p in "qkv"]
        gate_up = [f"{h}.mlp.gate_proj", f"{h}.mlp.up_proj"]
        names |= {f"{r}.attn_norm.weight": _s(f"{h}.input_layernorm.weight"),
                  f"{r}.mlp_norm.weight": _s(f"{h}.post_attention_layernorm.weight"),
                  f"{r}.attn.qkv.weight": _s(*(f"{k}.weight" for k in qkv)),
                  f"{r}.mlp.fc_in.weight": _s(*(f"{k}.weight" for k in gate_up)),
                  **_pair(f"{r}.attn.proj", f"{h}.self_attn.o_proj", bias=bias),
                  **_pair(f"{r}.mlp.fc_out", f"{h}.mlp.down_proj", bias=bias)}
        if bias:
            names |= {f"{r}.attn.qkv.bias": _s(*(f"{k}.bias" for k in qkv)),
                      f"{r}.mlp.fc_in.bias": _s(*(f"{k}.bias" for k in gate_up))}
    return names


def bert_names(n_layers: int, bias: bool = True) -> dict[str, Source]:
    e = "embeddings"
    names = {"embed.weight": _s(f"{e}.word_embeddings.weight"),
             "pos_embed.weight": _s(f"{e}.position_embeddings.weight"),
             "type_embed.weight": _s(f"{e}.token_type_embeddings.weight"),
             **_pair("embed_norm", f"{e}.LayerNorm")}
    for i in range(n_layers):
        r, h = f"layers.{i}", f"encoder.layer.{i}"
        qkv = [f"{h}.attention.self.{p}" for p in ("query", "key", "value")]
        names |= {f"{r}.attn.qkv.weight": _s(*(f"{k}.weight" for k in qkv)),
                  f"{r}.attn.qkv.bias": _s(*(f"{k}.bias" for k in qkv)),
                  **_pair(f"{r}.attn.proj", f"{h}.attention.output.dense"),
                  **_pair(f"{r}.attn_norm", f"{h}.attention.output.LayerNorm"),
                  **_pair(f"{r}.mlp.fc_in", f"{h}.intermediate.dense"),
                  **_pair(f"{r}.mlp.fc_out", f"{h}.output.dense"),
                  **_pair(f"{r}.mlp_norm", f"{h}.output.LayerNorm")}
    return names


NAMES = {"gpt2": gpt2_names, "llama": llama_names, "bert": bert_names}
# the key that tells where a family's base model sits in a checkpoint ("transformer.", "model.", "bert.")
_PROBE = {"gpt2": "wte.weight", "llama": "embed_tokens.weight", "bert": "embeddings.word_embeddings.weight"}


def hf_names(family: str, config) -> dict[str, Source]:
    """raytp parameter name -> its :class:`Source`, keys relative to the base model."""
    return NAMES[family](config.n_layers, getattr(config, "bias", True))


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


def _prefix(files: SafetensorsFiles, family: str) -> str:
    probe = _PROBE[family]
    for key in files.weight_map:
        if key == probe or key.endswith("." + probe):
            return key[: len(key) - len(probe)]
    raise CheckpointError(f"no tensor named like {probe!r}: is this a {family} checkpoint?")


def _resolve(files: SafetensorsFiles, prefix: str, key: str) -> str:
    for candidate in (prefix + key, key):
        if candidate in files:
            return candidate
    raise CheckpointError(f"the checkpoint has no tensor {prefix + key!r}")


@torch.no_grad()
def load_hf_weights_(model: nn.Module, files: SafetensorsFiles, family: str, tp_rank: int) -> nn.Module:
    """Fill every parameter of ``model`` (a raytp GPT or Bert) with this rank's part of
    its checkpoint tensors, reading only that part."""
    names, prefix = hf_names(family, model.config), _prefix(files, family)
    for name, param in model.named_parameters():
        if name not in names:
            raise CheckpointError(f"no {family} checkpoint tensor maps to raytp parameter {name!r}")
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
    family = model_family(hf)
    config = config_from_hf(hf, dtype, **overrides)
    config.check_tp(mesh.tp_size)
    with open_hf_checkpoint(path) as files:
        model = (Bert if family == "bert" else GPT)(config, mesh, device=device, init=False)
        load_hf_weights_(model, files, family, mesh.tp_rank)
    log.info("loaded %s (%s) at tp rank %d/%d", path, family, mesh.tp_rank, mesh.tp_size)
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
