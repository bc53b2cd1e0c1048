"""One record per Hugging Face model family: everything raytp needs to load, export and
parallelize that family, in one place.

A :class:`Family` names the ``model_type`` values it accepts, the raytp config and
model it becomes, its config converters (:mod:`raytp.models.hf_convert`), its weight-name
map (:mod:`raytp.models.hf_names`), the checkpoint key that locates its base model,
how it is exported (:class:`Export`, None when raytp does not write it) and raytp's own
TP plan for a ``transformers`` model of it that ships none (:class:`TPPlan`).
:data:`FAMILIES` is the registry that :mod:`~raytp.models.hf`, ``hf_config``,
``hf_export`` and ``hf_parallel`` read, at call time; adding a family is one record
here (plus its raytp model).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from raytp.models.bert import Bert, BertConfig
from raytp.models.config import GPTConfig
from raytp.models.gpt import GPT
from raytp.models.hf_convert import (
    bert_from_hf,
    gpt2_from_hf,
    gpt2_to_hf,
    llama_from_hf,
    llama_to_hf,
)
from raytp.models.hf_names import Source, bert_names, gpt2_names, llama_names
from raytp.parallelize import Colwise


@dataclass(frozen=True)
class Export:
    """How a family is written as a Hugging Face checkpoint (``config.json`` +
    ``model.safetensors``) that ``transformers`` loads as ``architectures[0]``.

    ``to_hf(config)`` gives the config.json fields (model_type and architectures are
    added), or None when this family does not compute what ``config`` does; ``needs``
    says what it needs and ``reads`` names the config fields it decides on, for the
    error when no family exports a config. ``base_prefix`` is where the base model sits
    in ``architectures[0]``; ``outside`` are the checkpoint keys outside it (the LM
    head); ``vocab_rows`` the raytp parameters whose rows are the padded vocabulary."""

    label: str
    architectures: tuple[str, ...]
    base_prefix: str
    to_hf: Callable[[Any], dict[str, Any] | None]
    needs: str
    reads: tuple[str, ...]
    outside: tuple[str, ...] = ()
    vocab_rows: tuple[str, ...] = ("embed.weight", "lm_head.weight")

    def __post_init__(self):
        if not self.label or not self.architectures or not self.reads:
            raise ValueError(f"Export(label={self.label!r}, architectures={self.architectures!r}, "
                             f"reads={self.reads!r}): each must be non-empty")
        if self.base_prefix and not self.base_prefix.endswith("."):
            raise ValueError(f"Export: base_prefix={self.base_prefix!r} must be empty or end with '.'")


@dataclass(frozen=True)
class TPPlan:
    """raytp's plan for a ``transformers`` model of the family that ships none.

    ``styles`` maps patterns, relative to the base model, to styles (a name or a style
    object of :mod:`raytp.parallelize`). ``prepare(model, prefix)`` runs first and
    returns more such entries; ``localize(model, prefix, tp)`` runs after, setting the
    sizes a module keeps that sharding changed to this rank's value."""

    styles: Mapping[str, Any] = field(hash=False)
    prepare: Callable[[nn.Module, str], dict[str, Any]] | None = None
    localize: Callable[[nn.Module, str, int], None] | None = None

    def __post_init__(self):
        if not self.styles:
            raise ValueError("TPPlan: styles must name at least one module pattern")


@dataclass(frozen=True)
class Family:
    """A Hugging Face model family as raytp loads, exports and parallelizes it.

    ``config_from_hf(hf)`` gives the keyword arguments of ``config_cls`` (a ValueError
    naming an option raytp does not compute); ``model_cls(config, mesh, device=...,
    init=False)`` builds this rank's shard. ``names(n_layers, bias)`` maps each raytp
    parameter to its :class:`~raytp.models.hf_names.Source`, keys relative to the base
    model; ``probe`` is a key of the base model whose prefix in a checkpoint is the
    base model's (``transformer.``, ``model.``, ``bert.`` or none)."""

    name: str
    model_types: tuple[str, ...]
    description: str
    config_cls: type
    model_cls: type
    config_from_hf: Callable[[dict[str, Any]], dict[str, Any]]
    names: Callable[[int, bool], dict[str, Source]]
    probe: str
    export: Export | None = None
    tp_plan: TPPlan | None = None

    def __post_init__(self):
        if not self.name or not self.probe or not self.description:
            raise ValueError(f"Family(name={self.name!r}, probe={self.probe!r}, description="
                             f"{self.description!r}): each must be non-empty")
        if not self.model_types or not all(isinstance(t, str) and t for t in self.model_types):
            raise ValueError(f"Family {self.name!r}: model_types={self.model_types!r} must be a non-empty "
                             "tuple of names")

    def config_to_hf(self, config) -> dict[str, Any] | None:
        """The ``config.json`` of this family's model equal to ``config``; None when the
        family is not exported or does not compute what ``config`` does."""
        if self.export is None or not isinstance(config, self.config_cls):
            return None
        fields = self.export.to_hf(config)
        if fields is None:
            return None
        return {"model_type": self.model_types[0], "architectures": list(self.export.architectures), **fields}


def _conv1d_to_linear(model: nn.Module, names: list[str]) -> None:
    """GPT-2's Conv1D (weight (in, out), ``x @ W + b``) as the equal ``nn.Linear``."""
    for name in names:
        conv = model.get_submodule(name)
        linear = nn.Linear(conv.weight.shape[0], conv.weight.shape[1], device=conv.weight.device,
                           dtype=conv.weight.dtype)
        linear.weight.data.copy_(conv.weight.T)
        linear.bias.data.copy_(conv.bias)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, linear)


def _gpt2_prepare(model: nn.Module, prefix: str) -> dict[str, Any]:
    """Conv1D layers become ``nn.Linear``; the fused ``c_attn`` is column-parallel in
    three blocks [Q | K | V], each split by heads."""
    layers = [f"{prefix}h.{i}" for i in range(model.config.n_layer)]
    _conv1d_to_linear(model, [f"{h}.{p}" for h in layers
                              for p in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")])
    d = model.config.n_embd
    return {"h.*.attn.c_attn": Colwise(blocks=(d, d, d))}


def _gpt2_localize(model: nn.Module, prefix: str, tp: int) -> None:
    """``c_attn``'s output is split with ``split_size``: the local width of each of Q, K, V."""
    for i in range(model.config.n_layer):
        model.get_submodule(f"{prefix}h.{i}.attn").split_size = model.config.n_embd // tp


GPT2 = Family(
    name="gpt2", model_types=("gpt2",), description="GPT-2 (GPT2LMHeadModel, GPT2Model)",
    config_cls=GPTConfig, model_cls=GPT, config_from_hf=gpt2_from_hf, names=gpt2_names, probe="wte.weight",
    export=Export(label="GPT-2", architectures=("GPT2LMHeadModel",), base_prefix="transformer.",
                  to_hf=gpt2_to_hf,
                  needs="layernorm, gelu or gelu_tanh, learned positions, biases, tied, n_kv_heads = n_heads",
                  reads=("norm", "activation", "positions", "bias", "tie_embeddings", "n_kv_heads")),
    tp_plan=TPPlan(styles={"h.*.attn.c_proj": "rowwise", "h.*.mlp.c_fc": "colwise",
                           "h.*.mlp.c_proj": "rowwise"},
                   prepare=_gpt2_prepare, localize=_gpt2_localize),
)

# Llama ships its own plan (config.base_model_tp_plan): no TPPlan of raytp's
LLAMA = Family(
    name="llama", model_types=("llama",), description="Llama-style decoders (LlamaForCausalLM, LlamaModel)",
    config_cls=GPTConfig, model_cls=GPT, config_from_hf=llama_from_hf, names=llama_names,
    probe="embed_tokens.weight",
    export=Export(label="Llama", architectures=("LlamaForCausalLM",), base_prefix="model.", to_hf=llama_to_hf,
                  needs="rmsnorm, swiglu, rope", reads=("norm", "activation", "positions"),
                  outside=("lm_head.weight",)),
)

_LAYER = "encoder.layer.*"
BERT = Family(
    name="bert", model_types=("bert",), description="BERT encoders (BertModel)",
    config_cls=BertConfig, model_cls=Bert, config_from_hf=bert_from_hf, names=bert_names,
    probe="embeddings.word_embeddings.weight",
    tp_plan=TPPlan(styles={**{f"{_LAYER}.attention.self.{p}": "colwise" for p in ("query", "key", "value")},
                           f"{_LAYER}.attention.output.dense": "rowwise",
                           f"{_LAYER}.intermediate.dense": "colwise", f"{_LAYER}.output.dense": "rowwise"}),
)

FAMILIES: tuple[Family, ...] = (GPT2, LLAMA, BERT)


def family_of_model_type(model_type: str | None) -> Family | None:
    """The family that accepts ``model_type``, or None."""
    return next((f for f in FAMILIES if model_type in f.model_types), None)


def family_of(hf: Mapping[str, Any]) -> Family:
    """The family of a Hugging Face config dict (its ``model_type``); a ValueError
    listing the supported ones otherwise."""
    family = family_of_model_type(hf.get("model_type"))
    if family is None:
        supported = "; ".join(f"{', '.join(map(repr, f.model_types))}: {f.description}" for f in FAMILIES)
        raise ValueError(f"model_type={hf.get('model_type')!r} (architectures {hf.get('architectures')}) is "
                         f"not supported; raytp loads model_type {supported}")
    return family


def family_named(name: str | Family) -> Family:
    """The family called ``name`` (a :class:`Family` is returned as it is)."""
    if isinstance(name, Family):
        return name
    for family in FAMILIES:
        if family.name == name:
            return family
    raise ValueError(f"no model family named {name!r}; raytp has {[f.name for f in FAMILIES]}")


def export_family_of(config) -> Family:
    """The exported family that computes what the raytp ``config`` does (the first one);
    a ValueError naming the config's deciding fields and each family's needs otherwise."""
    exported = [f for f in FAMILIES if f.export is not None]
    for family in exported:
        if family.config_to_hf(config) is not None:
            return family
    candidates = [f for f in exported if isinstance(config, f.config_cls)]
    if not candidates:
        raise ValueError(f"raytp exports {' or '.join(f.export.label for f in exported)} checkpoints; the "
                         f"model's config is a {type(config).__name__}")
    reads = dict.fromkeys(k for f in candidates for k in f.export.reads)  # in order, once each
    fields = ", ".join(f"{k}={getattr(config, k)!r}" for k in reads)
    needs = [f"{f.export.label} ({f.export.needs})" for f in candidates]
    neither = f"neither {' nor '.join(needs)}" if len(needs) > 1 else f"not {needs[0]}"
    raise ValueError(f"{type(config).__name__}({fields}) is {neither}")
