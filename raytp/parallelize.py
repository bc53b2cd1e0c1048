"""Turn a plain ``nn.Module`` into a TP module from a plan."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import TypeVar

from torch import nn

from raytp.mesh import DeviceMesh
from raytp.nn import ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding

V = TypeVar("V")


@dataclass(frozen=True)
class Colwise:
    """Column-parallel: output sharded on the last dim (gathered with ``gather_output``);
    ``blocks`` for a fused output (see :class:`~raytp.nn.ColumnParallelLinear`)."""

    gather_output: bool = False
    blocks: tuple | None = None
    kind = nn.Linear

    def __call__(self, module: nn.Linear, mesh: DeviceMesh) -> ColumnParallelLinear:
        return ColumnParallelLinear.from_linear(module, mesh, gather_output=self.gather_output,
                                                blocks=self.blocks)


@dataclass(frozen=True)
class Rowwise:
    """Row-parallel: input sharded on the last dim (or replicated and sliced here with
    ``input_is_parallel=False``), output all-reduced."""

    input_is_parallel: bool = True
    kind = nn.Linear

    def __call__(self, module: nn.Linear, mesh: DeviceMesh) -> RowParallelLinear:
        return RowParallelLinear.from_linear(module, mesh, input_is_parallel=self.input_is_parallel)


@dataclass(frozen=True)
class Vocab:
    """Vocabulary rows sharded (padded to a multiple of tp), output all-reduced."""

    kind = nn.Embedding

    def __call__(self, module: nn.Embedding, mesh: DeviceMesh) -> VocabParallelEmbedding:
        return VocabParallelEmbedding.from_embedding(module, mesh)


STYLES = {
    "colwise": Colwise(),  # output sharded on the last dim
    "colwise_gather": Colwise(gather_output=True),  # output gathered, replicated
    "rowwise": Rowwise(),  # input sharded on the last dim, output all-reduced
    "vocab": Vocab(),  # vocabulary rows sharded, output all-reduced
}
Style = Colwise | Rowwise | Vocab


def parallelize(module: nn.Module, mesh: DeviceMesh, plan: dict[str, str | Style] | str) -> nn.Module:
    """Replace the submodules named in ``plan`` by TP versions holding this rank's slices
    of their own weights, so that ``module`` computes the same function. Returns it.

    ``plan`` maps a pattern of a submodule's qualified name to a style: a name from
    :data:`STYLES` or a style object (:class:`Colwise`, :class:`Rowwise`,
    :class:`Vocab`). A pattern is matched one dotted part at a time with shell
    wildcards (``"layers.*.mlp.fc1"``). A pattern that matches nothing, a name two
    patterns match, a module of the wrong type or a size tp does not divide is a
    ``ValueError`` naming it. A column-parallel layer must feed a row-parallel one
    (or be gathered): the code between them sees (..., features / tp).

    ``plan="auto"`` parallelizes a Hugging Face ``transformers`` model: with the TP plan
    it ships, or raytp's plan for GPT-2 and BERT (see :mod:`raytp.models.hf_parallel`).
    """
    if plan == "auto":
        from raytp.models.hf_parallel import parallelize_hf

        return parallelize_hf(module, mesh)
    chosen = check_plan(module, plan)
    for name, style in chosen.items():
        factory = STYLES[style] if isinstance(style, str) else style
        try:
            replacement = factory(module.get_submodule(name), mesh)
        except ValueError as e:
            raise ValueError(f"{name!r} ({style}): {e}") from None
        parent, _, child = name.rpartition(".")
        setattr(module.get_submodule(parent), child, replacement)
    return module


def check_plan(module: nn.Module, plan) -> dict[str, str | Style]:
    """``{submodule name: style}`` of ``plan`` on ``module`` (it may live on the meta
    device: nothing is computed); a ``ValueError`` for a style that is not one, a
    pattern that matches nothing, a name two patterns match or a module of the wrong type."""
    if not isinstance(plan, dict) or not plan:
        raise ValueError(f"plan must be a non-empty dict of pattern -> style, or 'auto'; got {plan!r}")
    for pattern, style in plan.items():
        if not isinstance(style, (Colwise, Rowwise, Vocab)) and style not in STYLES:
            raise ValueError(f"plan[{pattern!r}] = {style!r} is not one of {sorted(STYLES)}")
    chosen = match_patterns(module, plan, "plan", lambda pattern, names: f"its submodules are {names}")
    for name, style in chosen.items():
        kind = (STYLES[style] if isinstance(style, str) else style).kind
        sub = module.get_submodule(name)
        if type(sub) is not kind:
            raise ValueError(f"{name!r} is a {type(sub).__name__}; style {style!r} needs "
                             f"an {kind.__name__}")
    return chosen


def check_plan_flow(module: nn.Module, chosen: Mapping[str, str | Style]) -> None:
    """Refuse a column-parallel output that would reach a replicated layer. The rule, on
    the layers with parameters of their own in the order ``module`` registers them (the
    order of ``named_modules()``: define submodules in the order ``forward`` uses them):
    after a ``colwise`` layer (output sharded, (..., out_features / tp)), the next such
    layer outside the plan must come after a ``rowwise`` one (which takes the sharded
    input and all-reduces) and the model must not end on it; ``colwise_gather`` (output
    gathered) needs nothing. Colwise layers in a row are parallel branches (Q, K, V; gate
    and up). A ``ValueError`` naming both layers and what to write instead."""
    sharded = None  # the last colwise layer whose output no rowwise has taken yet
    for name, sub in module.named_modules():
        if not name or next(sub.parameters(recurse=False), None) is None:
            continue
        style = chosen.get(name)
        factory = STYLES[style] if isinstance(style, str) else style
        if isinstance(factory, Colwise):
            sharded = None if factory.gather_output else name
        elif isinstance(factory, Rowwise):
            sharded = None
        elif factory is None and sharded is not None:
            raise ValueError(
                f"plan: {sharded!r} is colwise, so its output is sharded (..., features / tp), but the "
                f"next layer with parameters, {name!r} ({type(sub).__name__}), is not in the plan and "
                f"would see that sharded output: a colwise output must reach a rowwise layer (or be "
                f"gathered) before any replicated layer with parameters, in the order the submodules are "
                f"registered. Make the layer that takes {sharded!r}'s output 'rowwise' ({name!r} itself, "
                f"if it is that layer), or make {sharded!r} 'colwise_gather'")
    if sharded is not None:
        raise ValueError(
            f"plan: {sharded!r} is colwise and no rowwise layer follows it, so the model's output would "
            f"be sharded (..., features / tp): a colwise output must reach a rowwise layer (or be "
            f"gathered). Make {sharded!r} 'colwise_gather', or add a 'rowwise' layer after it")


def match_patterns(module: nn.Module, patterns: Mapping[str, V], what: str,
                   names_hint: Callable[[str, list[str]], str]) -> dict[str, V]:
    """``{submodule name: value}`` for every submodule of ``module`` that a pattern of
    ``patterns`` matches (dotted parts matched one by one, ``fnmatch`` within a part). A
    pattern that matches nothing (``names_hint`` says what there is), or a submodule that
    two patterns match, is a ``ValueError`` that names ``what`` the patterns are for."""
    names = [name for name, _ in module.named_modules() if name]
    chosen: dict[str, V] = {}
    for pattern, value in patterns.items():
        hits = [name for name in names if _matches(pattern, name)]
        if not hits:
            raise ValueError(f"{what} pattern {pattern!r} matches no submodule of "
                             f"{type(module).__name__}; {names_hint(pattern, names)}")
        for name in hits:
            if name in chosen:
                raise ValueError(f"submodule {name!r} matches more than one {what} pattern")
            chosen[name] = value
    return chosen


def _matches(pattern: str, name: str) -> bool:
    parts, name_parts = pattern.split("."), name.split(".")
    return len(parts) == len(name_parts) and all(map(fnmatchcase, name_parts, parts))
