"""Hugging Face ``config.json`` to raytp model configs, and back (for export).

The supported families are the records of :mod:`raytp.models.families`: GPT-2
(``model_type`` "gpt2") and Llama-style decoders ("llama") map onto
:class:`~raytp.models.GPTConfig`; BERT encoders ("bert") onto
:class:`~raytp.models.bert.BertConfig`. Any other architecture, and any option of a
supported one that raytp does not compute (rope scaling, an explicit head_dim other
than hidden_size / heads, ...), is a ValueError naming it.
"""

from __future__ import annotations

from typing import Any

from raytp.models.bert import BertConfig
from raytp.models.config import GPTConfig
from raytp.models.families import export_family_of, family_of


def model_family(hf: dict[str, Any]) -> str:
    """The name of the family of ``hf`` (``"gpt2"``, ``"llama"``, ``"bert"``); a
    ValueError listing the supported ones otherwise."""
    return family_of(hf).name


def config_from_hf(hf: dict[str, Any], dtype: str = "float32", **overrides) -> GPTConfig | BertConfig:
    """The raytp config of a Hugging Face config dict; ``overrides`` replace fields
    (``sequence_parallel=True``, ``dropout=0.1``, ...)."""
    family = family_of(hf)
    return family.config_cls(**{**family.config_from_hf(hf), "dtype": dtype, **overrides})


def export_family(c: GPTConfig) -> str:
    """``"gpt2"`` or ``"llama"``: the Hugging Face family that computes what ``c`` does."""
    return export_family_of(c).name


def config_to_hf(c: GPTConfig) -> dict[str, Any]:
    """The ``config.json`` of the Hugging Face model equal to ``c``."""
    return export_family_of(c).config_to_hf(c)
