"""Hugging Face ``config.json`` fields to raytp config fields and back, per model family.

``*_from_hf(hf)`` reads a Hugging Face config dict and returns the keyword arguments
of the raytp config (:class:`~raytp.models.GPTConfig` for GPT-2 and Llama,
:class:`~raytp.models.bert.BertConfig` for BERT); an option raytp does not compute
(rope scaling, an explicit head_dim other than hidden_size / heads, ...) is a
ValueError naming it. ``*_to_hf(config)`` returns the Hugging Face fields of the model
equal to a raytp config, or None when that family does not compute what the config
does. A family's record (:mod:`raytp.models.families`) names its pair.
"""

from __future__ import annotations

from typing import Any

from raytp.models.config import GPTConfig

_GELU = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu_fast": "gelu_tanh"}


def _activation(hf: dict, key: str, choices: dict[str, str]) -> str:
    name = hf.get(key, "gelu")
    if name not in choices:
        raise ValueError(f"{key}={name!r} is not supported; raytp computes {sorted(choices)}")
    return choices[name]


def gpt2_from_hf(hf: dict) -> dict[str, Any]:
    if hf.get("scale_attn_by_inverse_layer_idx") or not hf.get("scale_attn_weights", True):
        raise ValueError("GPT-2 attention must be scaled by 1 / sqrt(head_dim) (scale_attn_weights=True, "
                         "scale_attn_by_inverse_layer_idx=False)")
    if hf.get("add_cross_attention"):
        raise ValueError("GPT-2 with cross-attention (add_cross_attention=True) is not supported")
    d = hf["n_embd"]
    return {"vocab_size": hf["vocab_size"], "n_layers": hf["n_layer"], "n_heads": hf["n_head"],
            "d_model": d, "d_ff": hf.get("n_inner") or 4 * d, "max_seq_len": hf["n_positions"],
            "norm": "layernorm", "activation": _activation(hf, "activation_function", _GELU),
            "positions": "learned", "tie_embeddings": hf.get("tie_word_embeddings", True),
            "bias": True, "norm_eps": hf.get("layer_norm_epsilon", 1e-5)}


def _rope_theta(hf: dict) -> float:
    params = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or {}
    kind = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    if kind != "default":
        raise ValueError(f"rope_type={kind!r} (RoPE scaling) is not supported; raytp computes "
                         "plain RoPE (rope_type 'default')")
    return float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))


def llama_from_hf(hf: dict) -> dict[str, Any]:
    d, heads = hf["hidden_size"], hf["num_attention_heads"]
    if hf.get("head_dim") not in (None, d // heads):
        raise ValueError(f"head_dim={hf['head_dim']} != hidden_size / num_attention_heads = {d} / "
                         f"{heads}: raytp's attention needs head_dim = d_model / n_heads")
    _activation(hf, "hidden_act", {"silu": "swiglu"})
    bias = hf.get("attention_bias", False)
    if hf.get("mlp_bias", False) != bias:
        raise ValueError(f"attention_bias={bias} and mlp_bias={hf.get('mlp_bias')} differ; raytp's "
                         "bias option covers both")
    return {"vocab_size": hf["vocab_size"], "n_layers": hf["num_hidden_layers"], "n_heads": heads,
            "n_kv_heads": hf.get("num_key_value_heads") or heads, "d_model": d,
            "d_ff": hf["intermediate_size"], "max_seq_len": hf["max_position_embeddings"],
            "norm": "rmsnorm", "activation": "swiglu", "positions": "rope",
            "tie_embeddings": hf.get("tie_word_embeddings", False), "bias": bias,
            "rope_theta": _rope_theta(hf), "norm_eps": hf.get("rms_norm_eps", 1e-6)}


def bert_from_hf(hf: dict) -> dict[str, Any]:
    if hf.get("position_embedding_type", "absolute") != "absolute":
        raise ValueError(f"position_embedding_type={hf['position_embedding_type']!r} is not supported "
                         "(only 'absolute')")
    return {"vocab_size": hf["vocab_size"], "n_layers": hf["num_hidden_layers"],
            "n_heads": hf["num_attention_heads"], "d_model": hf["hidden_size"],
            "d_ff": hf["intermediate_size"], "max_seq_len": hf["max_position_embeddings"],
            "type_vocab_size": hf.get("type_vocab_size", 2),
            "activation": _activation(hf, "hidden_act", _GELU), "norm_eps": hf.get("layer_norm_eps", 1e-12)}


def gpt2_to_hf(c: GPTConfig) -> dict[str, Any] | None:
    """GPT-2 computes layernorm, gelu or gelu_tanh, learned positions, biases, tied
    embeddings and n_kv_heads = n_heads."""
    if not (c.norm == "layernorm" and c.positions == "learned" and c.activation in ("gelu", "gelu_tanh")
            and c.bias and c.tie_embeddings and c.n_kv_heads == c.n_heads):
        return None
    return {"vocab_size": c.vocab_size, "n_layer": c.n_layers, "n_head": c.n_heads, "n_embd": c.d_model,
            "n_inner": c.d_ff, "n_positions": c.max_seq_len, "layer_norm_epsilon": c.norm_eps,
            "activation_function": "gelu" if c.activation == "gelu" else "gelu_new",
            "tie_word_embeddings": True, "resid_pdrop": c.dropout, "embd_pdrop": c.dropout,
            "attn_pdrop": c.dropout, "torch_dtype": c.dtype}


def llama_to_hf(c: GPTConfig) -> dict[str, Any] | None:
    """Llama computes rmsnorm, swiglu and rope (with or without biases, tied or not, any
    number of key/value heads)."""
    if (c.norm, c.activation, c.positions) != ("rmsnorm", "swiglu", "rope"):
        return None
    return {"vocab_size": c.vocab_size, "num_hidden_layers": c.n_layers, "num_attention_heads": c.n_heads,
            "num_key_value_heads": c.n_kv_heads, "hidden_size": c.d_model, "intermediate_size": c.d_ff,
            "max_position_embeddings": c.max_seq_len, "rms_norm_eps": c.norm_eps, "hidden_act": "silu",
            "rope_theta": c.rope_theta,
            "rope_parameters": {"rope_type": "default", "rope_theta": c.rope_theta},
            "attention_bias": c.bias, "mlp_bias": c.bias, "tie_word_embeddings": c.tie_embeddings,
            "attention_dropout": c.dropout, "head_dim": c.head_dim, "torch_dtype": c.dtype}
