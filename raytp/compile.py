"""``torch.compile`` of a rank's transformer blocks, in place, with an eager fallback.

:func:`compile_blocks` compiles each block of a raytp model (``GPT.layers``,
``Bert.layers``), the submodules of a plain module that a set of ``fnmatch`` patterns
selects, or a whole plain module, with ``nn.Module.compile``: the module objects,
their parameter names and ``state_dict`` keys stay as they were (no ``_orig_mod.``),
so layer tags, checkpoints and optimizers see the same model.

raytp's collectives are marked ``torch.compiler.disable`` (:mod:`raytp.comm`): a
compiled block graph-breaks around each one, the compute between them is compiled,
and each collective still runs through its :class:`~raytp.comm.Communicator`, counted
as in eager mode. So are the layer-tag hooks (:mod:`raytp.tracing`) and the dropout RNG
forks, which makes a TP layer's GEMM its own graph and the norms, activations,
residual adds and attention between them the fused parts. Dropout masks under
``inductor`` are inductor's random numbers, not eager's (``aot_eager`` draws eager's).

A part whose compilation fails (``torch.compile`` compiles at a part's first call, or
a recompile) logs one warning with the reason and runs eager from then on; the failed
call is re-run eager, so collectives issued before the failure are issued again (the
same on every rank when the failure is, as compile errors are, the same on every
rank). An error that eager mode raises too is raised, and the part stays compiled.
"""

from __future__ import annotations

import fnmatch
import logging
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass

from torch import nn
from torch.utils import checkpoint

log = logging.getLogger(__name__)

# exceptions that are not failures: torch's checkpoint stops a recompute early by raising one
_CONTROL_FLOW = tuple(getattr(checkpoint, name) for name in ("_StopRecomputationError",)
                      if hasattr(checkpoint, name))
_EAGER = "_raytp_compile_failed"  # set on a part whose compiled call failed: it runs eager


@dataclass(frozen=True)
class CompileOptions:
    """What ``torch.compile`` is called with for each part: ``backend`` (``"inductor"``,
    ``"aot_eager"``, ..., or a backend callable), ``mode`` (None, ``"default"``, ``"reduce-overhead"``,
    ``"max-autotune"``, ...), ``fullgraph`` (True fails, then falls back to eager, for a
    block with collectives: they are graph breaks). ``parts``: what to compile, as
    :func:`select_parts` takes it (None: the model's blocks, or the whole module)."""

    backend: str | Callable = "inductor"
    mode: str | None = None
    fullgraph: bool = False
    parts: tuple[str, ...] | None = None

    def __post_init__(self):
        if not (isinstance(self.backend, str) and self.backend or callable(self.backend)):
            raise ValueError(f"backend={self.backend!r} must be a torch.compile backend: a name or a "
                             "callable")
        if self.mode is not None and not isinstance(self.mode, str):
            raise ValueError(f"mode={self.mode!r} must be a torch.compile mode name or None")
        if not isinstance(self.fullgraph, bool):
            raise ValueError(f"fullgraph={self.fullgraph!r} must be True or False")
        if self.parts is not None:
            object.__setattr__(self, "parts", _patterns(self.parts))

    def torch_kwargs(self) -> dict:
        """The keyword arguments of ``torch.compile``."""
        return {k: v for k, v in asdict(self).items() if k != "parts"}


def _patterns(value) -> tuple[str, ...]:
    if isinstance(value, Mapping):
        bad = {k: v for k, v in value.items() if not isinstance(k, str) or v is not True}
        if bad:
            raise ValueError(f"compile={dict(value)!r}: a pattern dict maps fnmatch patterns of module "
                             f"names to True; not {bad!r}")
        value = tuple(value)
    if isinstance(value, str) or not isinstance(value, tuple) or not value \
            or not all(isinstance(p, str) and p for p in value):
        raise ValueError(f"compile={value!r}: patterns must be a non-empty tuple (or dict) of fnmatch "
                         "patterns of module names, e.g. ('layers.*',)")
    return value


def compile_options(value) -> CompileOptions | None:
    """``BuildSpec.compile`` as options: True -> the defaults; False / None -> None (eager);
    a dict ``{pattern: True}`` or a tuple of patterns -> those parts; a
    :class:`CompileOptions` as it is. Anything else is a ``ValueError`` naming it."""
    if value is None or value is False:
        return None
    if value is True:
        return CompileOptions()
    if isinstance(value, CompileOptions):
        return value
    if isinstance(value, (Mapping, tuple)):
        return CompileOptions(parts=_patterns(value))
    raise ValueError(f"compile={value!r} must be True, False, a dict {{pattern: True}}, a tuple of "
                     "patterns or a raytp.compile.CompileOptions")


def model_blocks(module: nn.Module) -> dict[str, nn.Module] | None:
    """The transformer blocks of a raytp model (GPT, Bert) by qualified name, or None for
    another module."""
    from raytp.models.bert import Bert
    from raytp.models.gpt import GPT

    if isinstance(module, (GPT, Bert)):
        return {f"layers.{i}": block for i, block in enumerate(module.layers)}
    return None


def select_parts(module: nn.Module, patterns: tuple[str, ...]) -> dict[str, nn.Module]:
    """The submodules of ``module`` whose qualified names match one of ``patterns``
    (``fnmatch``), outermost only: a match inside a matched module is part of it.
    A pattern that matches no name is a ``ValueError`` naming it."""
    names = [name for name, _ in module.named_modules() if name]
    for pattern in patterns:
        if not fnmatch.filter(names, pattern):
            raise ValueError(f"compile pattern {pattern!r} matches no submodule; module names are e.g. "
                             f"{names[:6]}")
    chosen: dict[str, nn.Module] = {}
    for name, sub in module.named_modules():
        if name and any(fnmatch.fnmatchcase(name, p) for p in patterns) \
                and not any(name.startswith(f"{c}.") for c in chosen):
            chosen[name] = sub
    return chosen


def compile_blocks(module: nn.Module, spec_value, mesh=None) -> dict[str, nn.Module]:
    """Compile the parts of ``module`` that ``spec_value`` names (see :func:`compile_options`)
    in place and return them by name ({} when it says eager). Default parts: a raytp
    model's blocks, else the whole module (named ``""``). ``mesh`` only labels the log."""
    options = compile_options(spec_value)
    if options is None:
        return {}
    if options.parts is not None:
        parts = select_parts(module, options.parts)
    else:
        parts = model_blocks(module) or {"": module}
    where = f" (tp rank {mesh.tp_rank})" if mesh is not None else ""
    for name, part in parts.items():
        _compile_part(part, name or type(part).__name__, options, where)
    return parts


def _compile_part(part: nn.Module, name: str, options: CompileOptions, where: str) -> None:
    try:
        part.compile(**options.torch_kwargs())
    except Exception as exc:  # noqa: BLE001 - any reason to not compile leaves the part eager
        _fall_back(part, name, exc, where)
        return
    compiled = part._compiled_call_impl

    def guarded(*args, **kwargs):
        if getattr(part, _EAGER, False):
            return part._call_impl(*args, **kwargs)
        try:
            return compiled(*args, **kwargs)
        except _CONTROL_FLOW:
            raise
        except Exception as exc:  # noqa: BLE001 - eager mode tells a compile error from the forward's
            failure = exc
        out = part._call_impl(*args, **kwargs)  # an error of the forward itself raises here
        _fall_back(part, name, failure, where)
        return out

    part._compiled_call_impl = guarded


def _fall_back(part: nn.Module, name: str, exc: Exception, where: str) -> None:
    """The part runs eager from now on. A part whose compiled call was wrapped since
    (activation checkpointing around it, :mod:`raytp.activation_ckpt`) keeps the wrapper:
    the guard then calls the eager forward itself."""
    if getattr(part, "_compiled_call_impl", None) is not None:
        setattr(part, _EAGER, True)
    log.warning("torch.compile of %s failed%s, running it eager: %s", name, where, _reason(exc))


def is_compiled(part: nn.Module) -> bool:
    """Whether ``part`` runs compiled: compiled and not fallen back to eager."""
    return getattr(part, "_compiled_call_impl", None) is not None and not getattr(part, _EAGER, False)


def _reason(exc: BaseException) -> str:
    """One line: the exception, and the one it wraps (a backend's error inside Dynamo's)."""
    def line(e):
        text = str(e).strip()
        return f"{type(e).__name__}: {text.splitlines()[0][:200] if text else ''}"

    inner = getattr(exc, "inner_exception", None) or exc.__cause__
    return line(exc) if inner is None else f"{type(exc).__name__} ({line(inner)})"
