"""Turn a plain ``nn.Module`` into a TP module from a plan."""

from __future__ import annotations

from fnmatch import fnmatchcase

from torch import nn

from raytp.mesh import DeviceMesh
from raytp.nn import ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding


def _colwise(module, mesh):
    return ColumnParallelLinear.from_linear(module, mesh)


def _colwise_gather(module, mesh):
    return ColumnParallelLinear.from_linear(module, mesh, gather_output=True)


def _rowwise(module, mesh):
    return RowParallelLinear.from_linear(module, mesh)


def _vocab(module, mesh):
    return VocabParallelEmbedding.from_embedding(module, mesh)


# style -> (the module type it replaces, the factory of its TP version)
STYLES = {
    "colwise": (nn.Linear, _colwise),  # output sharded on the last dim
    "colwise_gather": (nn.Linear, _colwise_gather),  # output gathered, replicated
    "rowwise": (nn.Linear, _rowwise),  # input sharded on the last dim, output all-reduced
    "vocab": (nn.Embedding, _vocab),  # vocabulary rows sharded, output all-reduced
}


def parallelize(module: nn.Module, mesh: DeviceMesh, plan: dict[str, str]) -> nn.Module:
    """Replace the submodules named in ``plan`` by TP versions holding this rank's slices
    of their own weights, so that ``module`` computes the same function. Returns it.

    ``plan`` maps a pattern of a submodule's qualified name to a style from
    :data:`STYLES`. A pattern is matched one dotted part at a time with shell
    wildcards (``"layers.*.mlp.fc1"``). A pattern that matches nothing, a name two
    patterns match, a module of the wrong type or a size tp does not divide is a
    ``ValueError`` naming it. A column-parallel layer must feed a row-parallel one
    (or be gathered): the code between them sees (..., features / tp).
    """
    if not isinstance(plan, dict) or not plan:
        raise ValueError(f"plan must be a non-empty dict of pattern -> style, got {plan!r}")
    for pattern, style in plan.items():
        if style not in STYLES:
            raise ValueError(f"plan[{pattern!r}] = {style!r} is not one of {sorted(STYLES)}")
    names = [name for name, _ in module.named_modules() if name]
    chosen: dict[str, str] = {}
    for pattern, style in plan.items():
        hits = [name for name in names if _matches(pattern, name)]
        if not hits:
            raise ValueError(f"plan pattern {pattern!r} matches no submodule of "
                             f"{type(module).__name__}; its submodules are {names}")
        for name in hits:
            if name in chosen:
                raise ValueError(f"submodule {name!r} matches more than one plan pattern")
            chosen[name] = style
    for name, style in chosen.items():
        kind, factory = STYLES[style]
        sub = module.get_submodule(name)
        if type(sub) is not kind:
            raise ValueError(f"{name!r} is a {type(sub).__name__}; style {style!r} needs "
                             f"an {kind.__name__}")
        try:
            replacement = factory(sub, mesh)
        except ValueError as e:
            raise ValueError(f"{name!r} ({style}): {e}") from None
        parent, _, child = name.rpartition(".")
        setattr(module.get_submodule(parent), child, replacement)
    return module


def _matches(pattern: str, name: str) -> bool:
    parts, name_parts = pattern.split("."), name.split(".")
    return len(parts) == len(name_parts) and all(map(fnmatchcase, name_parts, parts))
