"""Export a sharded raytp GPT to a Hugging Face directory (``config.json`` +
``model.safetensors``) that ``transformers``' ``from_pretrained`` reads: GPT-2
(``GPT2LMHeadModel``) or Llama (``LlamaForCausalLM``), whichever computes what the
config does (the first exported record of :mod:`raytp.models.families` that does).

Every rank gathers each full parameter (one all-gather over the TP group per sharded
parameter: fine for an export, not for training); TP rank 0 of DP group 0 unpads the
vocabulary, splits the fused Q/K/V and gate/up blocks, transposes GPT-2's Conv1D
weights and writes the files.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from raytp import dtensor
from raytp.checkpoint.files import write_json, write_safetensors
from raytp.models.families import Export, export_family_of
from raytp.models.hf import Source, hf_names
from raytp.params import get_spec


def full_parameter(param: torch.Tensor, mesh) -> torch.Tensor:
    """The whole parameter on every rank of the TP group (an all-gather when sharded)."""
    return dtensor.of(param, mesh).full().detach()


def _hf_tensors(name: str, full: torch.Tensor, source: Source, spec, config, export: Export):
    """The Hugging Face tensors of one raytp parameter: unpadded, un-fused, transposed back."""
    if name in export.vocab_rows:
        full = full[: config.vocab_size]
    if len(source.keys) == 1:
        return {source.keys[0]: full.T if source.transposed else full}
    sizes = [size for size, _ in spec.blocks]
    return dict(zip(source.keys, full.split(sizes, dim=spec.placement.dim), strict=True))


@torch.no_grad()
def export_hf(model: nn.Module, mesh, directory: str | Path, *, dtype: str | None = None) -> bool:
    """Write ``model`` (a raytp :class:`~raytp.models.GPT`, or the view of its master
    weights, :meth:`raytp.precision.MasterWeights.view`) into ``directory`` as a Hugging
    Face checkpoint, its tensors in ``dtype`` (a torch dtype's name; None: as held), named
    in config.json's ``torch_dtype``. Every rank calls it (collectives: an all-gather per
    sharded parameter); TP rank 0 of DP group 0 writes, and returns True (the others False)."""
    cast = export_dtype(dtype)
    config = model.config
    family = export_family_of(config)  # a ValueError, on every rank, before any collective
    names, export = hf_names(family, config), family.export
    writer = mesh.rank == 0
    tensors = {}
    for name, param in model.named_parameters():
        full = full_parameter(param, mesh)
        if writer:
            for key, value in _hf_tensors(name, full, names[name], get_spec(param), config, export).items():
                prefix = "" if key in export.outside else export.base_prefix
                tensors[prefix + key] = (value if cast is None else value.to(cast)).contiguous()
    if not writer:
        return False
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    write_safetensors(directory / "model.safetensors", tensors)
    written = str(next(iter(tensors.values())).dtype).removeprefix("torch.")
    write_json(directory / "config.json", {**family.config_to_hf(config), "torch_dtype": written})
    return True


def export_dtype(dtype: str | None) -> torch.dtype | None:
    if dtype is None:
        return None
    if not isinstance(dtype, str) or not isinstance(getattr(torch, dtype, None), torch.dtype) \
            or not getattr(torch, dtype).is_floating_point:
        raise ValueError(f"export dtype={dtype!r} is not a torch floating-point dtype's name "
                         "(e.g. 'bfloat16', 'float16', 'float32')")
    return getattr(torch, dtype)
