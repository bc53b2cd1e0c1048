"""``raytp.parallelize(model, mesh, plan="auto")`` for Hugging Face ``transformers`` models.

The plan is the one the model ships (``model._tp_plan``, or ``config.base_model_tp_plan``
under the base model's prefix: Llama and most recent decoders), its styles mapped onto
raytp's; else raytp's own plan for the model's family (the ``tp_plan`` of its record in
:mod:`raytp.models.families`: GPT-2 and BERT). The installed transformers reshapes
attention with ``view(..., -1, head_dim)``, so column-parallel Q/K/V and a row-parallel
output projection compute each rank's heads unchanged. Where a module keeps a size
that sharding changes, it is set to this rank's local value, and said here:

- GPT-2's fused ``c_attn`` splits its output with ``split_size`` (d_model): set to
  d_model / tp. Its ``Conv1D`` layers become ``nn.Linear`` first (weight transposed).
  Both are steps of GPT-2's record (:data:`raytp.models.families.GPT2`).
- With fewer key/value heads than ranks, each rank keeps its key/value head whole
  (replicated over the ranks whose query heads use it) and ``num_key_value_groups``
  becomes the rank's query heads per key/value head.

Embeddings and a tied LM head stay replicated unless the shipped plan shards them.
"""

from __future__ import annotations

import logging

from torch import nn

from raytp.mesh import DeviceMesh
from raytp.models import families
from raytp.models.families import TPPlan, family_of_model_type
from raytp.nn.attention import check_heads
from raytp.parallelize import Colwise, Rowwise, Vocab, parallelize

log = logging.getLogger(__name__)

# Hugging Face style -> raytp style; None: left replicated (the same math, unsharded)
HF_STYLES = {
    "colwise": Colwise(), "local_colwise": Colwise(),
    "rowwise": Rowwise(), "local_rowwise": Rowwise(),
    "colwise_rep": Colwise(gather_output=True), "colwise_gather_output": Colwise(gather_output=True),
    "rowwise_rep": Rowwise(input_is_parallel=False), "rowwise_split_input": Rowwise(input_is_parallel=False),
    "embedding_rowwise": Vocab(),
    "sequence_parallel": None, "replicate": None, "replicated_with_grad_allreduce": None,
    "local_params": None, "local": None,
}


def _base_prefix(model: nn.Module) -> str:
    base = getattr(model, "base_model", model)
    if base is model:
        return ""
    name = next(n for n, m in model.named_modules() if m is base)
    return name + "."


def shipped_plan(model: nn.Module) -> dict[str, str]:
    """The TP plan the model ships, with qualified names (empty when none)."""
    plan = dict(getattr(model, "_tp_plan", None) or {})
    base_plan = getattr(model.config, "base_model_tp_plan", None) or {}
    prefix = _base_prefix(model)
    for pattern, style in base_plan.items():
        plan.setdefault(prefix + pattern, style)
    return plan


def raytp_styles(plan: dict[str, str]) -> dict:
    """``plan``'s styles as raytp's; a style raytp cannot honour is a ValueError naming it."""
    out = {}
    for pattern, style in plan.items():
        if style not in HF_STYLES:
            honoured = sorted(k for k, v in HF_STYLES.items() if v is not None)
            replicated = sorted(k for k, v in HF_STYLES.items() if v is None)
            raise ValueError(f"the model's TP plan has {pattern!r}: {style!r}, which raytp cannot honour "
                             f"(it maps {honoured}, and leaves {replicated} replicated)")
        if HF_STYLES[style] is None:
            log.info("plan %r: %r left replicated (same result, unsharded)", pattern, style)
        else:
            out[pattern] = HF_STYLES[style]
    return out


def _family_plan(model: nn.Module, mesh: DeviceMesh, plan: TPPlan) -> nn.Module:
    """Parallelize with raytp's own plan for the model's family (see :class:`TPPlan`)."""
    c = model.config
    check_heads(c.num_attention_heads, c.num_attention_heads, mesh.tp_size)
    prefix = _base_prefix(model)
    styles = {**plan.styles, **(plan.prepare(model, prefix) if plan.prepare else {})}
    parallelize(model, mesh, {prefix + k: v for k, v in styles.items()})
    if plan.localize:
        plan.localize(model, prefix, mesh.tp_size)
    return model


def _fix_kv_heads(model: nn.Module, plan: dict, mesh: DeviceMesh) -> dict:
    """Check every attention's heads against tp; keep key/value heads whole when there are
    fewer of them than ranks (see the module docstring)."""
    c, tp = model.config, mesh.tp_size
    heads = getattr(c, "num_attention_heads", None)
    kv_heads = getattr(c, "num_key_value_heads", None) or heads
    if heads is None:
        return plan
    check_heads(heads, kv_heads, tp)
    if kv_heads >= tp:
        return plan
    for name, module in model.named_modules():
        if hasattr(module, "num_key_value_groups") and hasattr(module, "k_proj"):
            for proj in ("k_proj", "v_proj"):
                width = getattr(module, proj).out_features
                plan[f"{name}.{proj}"] = Colwise(blocks=((width, kv_heads),))
            module.num_key_value_groups = heads // tp  # this rank's query heads share one key/value head
    return {k: v for k, v in plan.items() if not k.endswith(("k_proj", "v_proj")) or "*" not in k}


def parallelize_hf(model: nn.Module, mesh: DeviceMesh) -> nn.Module:
    """Parallelize a ``transformers`` model with the plan it ships, or raytp's plan for
    GPT-2 and BERT. Raises ValueError naming a size tp does not divide, an unsupported
    style, or a model with no plan."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if config is None:
        raise ValueError(f"plan='auto' needs a Hugging Face transformers model; got a {type(model).__name__}")
    plan = shipped_plan(model)
    if plan:
        return parallelize(model, mesh, _fix_kv_heads(model, raytp_styles(plan), mesh))
    family = family_of_model_type(model_type)
    if family is not None and family.tp_plan is not None:
        return _family_plan(model, mesh, family.tp_plan)
    covered = " and ".join(repr(t) for f in families.FAMILIES if f.tp_plan for t in f.model_types)
    raise ValueError(f"{type(model).__name__} (model_type={model_type!r}) ships no TP plan and raytp has "
                     f"none for it: pass plan={{pattern: style}}; raytp's own plans cover {covered}")
