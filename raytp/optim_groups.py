"""Parameter groups of the optimizer: weight decay for the weights of linear layers, none
for norms, biases and embeddings (what Megatron-Core and most GPT recipes do).

:func:`param_groups` splits a module's parameters (or named parameters) in two groups,
decay first, then no-decay (an empty group is left out); the same model gives the same
groups at every tp, so optimizer checkpoints reshard group by group.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from fnmatch import fnmatchcase

import torch
from torch import nn

NO_DECAY_MODES = ("default", "none")


def check_no_decay(no_decay) -> None:
    """``"default"``, ``"none"`` or a tuple of parameter-name patterns (fnmatch)."""
    if isinstance(no_decay, str):
        if no_decay not in NO_DECAY_MODES:
            raise ValueError(f"no_decay={no_decay!r} must be one of {NO_DECAY_MODES} or a tuple of "
                             "parameter-name patterns, e.g. ('*.bias', '*norm*')")
    elif not (isinstance(no_decay, tuple) and all(isinstance(p, str) for p in no_decay)):
        raise ValueError(f"no_decay={no_decay!r} must be one of {NO_DECAY_MODES} or a tuple of "
                         "parameter-name patterns (strings)")


@functools.cache
def _no_decay_modules() -> tuple[type, ...]:
    """Modules whose own parameters get no weight decay by default: norms and embeddings."""
    from raytp.models.bert import TokenTypeEmbedding
    from raytp.nn.embedding import PositionEmbedding, VocabParallelEmbedding
    from raytp.nn.norm import LayerNorm, RMSNorm

    return (nn.Embedding, nn.EmbeddingBag, nn.LayerNorm, nn.RMSNorm, nn.GroupNorm,
            nn.modules.batchnorm._NormBase, VocabParallelEmbedding, PositionEmbedding,
            TokenTypeEmbedding, LayerNorm, RMSNorm)


def _default_rule(name: str, p: torch.Tensor, owned: set[int]) -> bool:
    return p.dim() <= 1 or name.rsplit(".", 1)[-1] == "bias" or id(p) in owned


def _owned_by_no_decay_modules(model: nn.Module) -> set[int]:
    kinds = _no_decay_modules()
    return {id(p) for m in model.modules() if isinstance(m, kinds) for p in m.parameters(recurse=False)}


def _named(model_or_named_params) -> tuple[list[tuple[str, torch.Tensor]], set[int]]:
    if isinstance(model_or_named_params, nn.Module):
        model = model_or_named_params
        return list(model.named_parameters()), _owned_by_no_decay_modules(model)
    named = list(model_or_named_params)
    if not _is_named(named):
        raise TypeError("param_groups takes a module or (name, parameter) pairs, e.g. "
                        "model.named_parameters()")
    return named, set()


def param_groups(model_or_named_params: nn.Module | Iterable[tuple[str, torch.Tensor]],
                 weight_decay: float, no_decay: str | tuple[str, ...] = "default") -> list[dict]:
    """``[{"params": decay, "weight_decay": weight_decay}, {"params": no_decay,
    "weight_decay": 0.0}]``, in ``named_parameters()`` order, each shared parameter once;
    an empty group is left out. Which parameters get no decay:

    - ``"default"``: every parameter of a norm or an embedding module (torch's
      ``LayerNorm``, ``RMSNorm``, ``GroupNorm``, batch norms, ``Embedding``; raytp's
      ``LayerNorm``, ``RMSNorm``, ``VocabParallelEmbedding``, ``PositionEmbedding``,
      BERT's token-type table; a weight tied to an embedding counts as the embedding's),
      every bias and every parameter of at most one dimension. Given only
      ``(name, parameter)`` pairs, the modules are unknown: biases and 1-D parameters.
    - ``"none"``: one group, every parameter decayed.
    - a tuple of fnmatch patterns: the parameters whose full name matches one
      (``("*.bias", "*norm*")``; ``*`` matches dots too).
    """
    check_no_decay(no_decay)
    named, owned = _named(model_or_named_params)
    if no_decay == "none":
        return [{"params": [p for _, p in named], "weight_decay": weight_decay}]
    if no_decay == "default":
        off = [_default_rule(name, p, owned) for name, p in named]
    else:
        off = [any(fnmatchcase(name, pattern) for pattern in no_decay) for name, _ in named]
    decay = [p for (_, p), o in zip(named, off, strict=True) if not o]
    kept = [p for (_, p), o in zip(named, off, strict=True) if o]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": kept, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def _is_named(items: list) -> bool:
    return bool(items) and all(isinstance(x, tuple) and len(x) == 2 and isinstance(x[0], str) for x in items)


def grouped(params, weight_decay: float, no_decay: str | tuple[str, ...]) -> list:
    """What an optimizer spec's ``build(params)`` hands to torch: the groups of
    :func:`param_groups` for a module or ``(name, parameter)`` pairs; plain parameters
    (or torch param-group dicts) as given, one group as ``torch.optim`` makes it, since
    without names no group can be told (a tuple of patterns is then refused)."""
    if isinstance(params, nn.Module):
        return param_groups(params, weight_decay, no_decay)
    items = [params] if isinstance(params, torch.Tensor) else list(params)
    if _is_named(items):
        return param_groups(items, weight_decay, no_decay)
    if isinstance(no_decay, tuple):
        raise ValueError(f"no_decay={no_decay!r} names parameters, but build() got them without names: "
                         "pass the module or its named_parameters()")
    return items
