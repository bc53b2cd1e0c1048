"""Export a sharded raytp GPT to a Hugging Face directory (``config.json`` +
``model.safetensors``) that ``transformers``' ``from_pretrained`` reads: GPT-2
(``GPT2LMHeadModel``) or Llama (``LlamaForCausalLM``), whichever computes what the
config does.

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
from raytp.models.config import GPTConfig
from raytp.models.hf import Source, hf_names
from raytp.models.hf_config import config_to_hf, export_family
from raytp.params import get_spec

_BASE = {"gpt2": "transformer.", "llama": "model."}  # where the base model sits in the *LMHeadModel
_OUTSIDE = ("lm_head.weight",)  # keys of the LM head, outside the base model
_VOCAB_ROWS = ("embed.weight", "lm_head.weight")


def full_parameter(param: torch.Tensor, mesh) -> torch.Tensor:
    """The whole parameter on every rank of the TP group (an all-gather when sharded)."""
    return dtensor.of(param, mesh).full().detach()


def _hf_tensors(name: str, full: torch.Tensor, source: Source, spec, config: GPTConfig):
    """The Hugging Face tensors of one raytp parameter: unpadded, un-fused, transposed back."""
    if name in _VOCAB_ROWS:
        full = full[: config.vocab_size]
    if len(source.keys) == 1:
        return {source.keys[0]: full.T if source.transposed else full}
    sizes = [size for size, _ in spec.blocks]
    return dict(zip(source.keys, full.split(sizes, dim=spec.placement.dim), strict=True))


@torch.no_grad()
def export_hf(model: nn.Module, mesh, directory: str | Path) -> bool:
    """Write ``model`` (a raytp :class:`~raytp.models.GPT`) into ``directory`` as a
    Hugging Face checkpoint. Every rank calls it (collectives: an all-gather per sharded
    parameter); TP rank 0 of DP group 0 writes, and returns True (the others False)."""
    config = model.config
    if not isinstance(config, GPTConfig):
        raise ValueError(f"export_hf writes GPT-2 or Llama checkpoints; the model's config is a "
                         f"{type(config).__name__}")
    family = export_family(config)
    names = hf_names(family, config)
    writer = mesh.rank == 0
    tensors = {}
    for name, param in model.named_parameters():
        full = full_parameter(param, mesh)
        if writer:
            for key, value in _hf_tensors(name, full, names[name], get_spec(param), config).items():
                prefix = "" if key in _OUTSIDE else _BASE[family]
                tensors[prefix + key] = value.contiguous()
    if not writer:
        return False
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    write_safetensors(directory / "model.safetensors", tensors)
    write_json(directory / "config.json", config_to_hf(config))
    return True
