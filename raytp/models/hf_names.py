"""Hugging Face checkpoint names of each raytp parameter, per model family.

``gpt2_names``, ``llama_names`` and ``bert_names`` map a raytp parameter name to the
:class:`Source` it is read from (and written back to on export): the checkpoint keys,
relative to the base model (``transformer.``, ``model.``, ``bert.`` stripped), that are
concatenated along the parameter's shard dim, each transposed first where the
checkpoint stores (in, out). A family's record (:mod:`raytp.models.families`) names its map.
"""

from __future__ import annotations

from dataclasses import dataclass


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
