"""Activation checkpointing: drop a block's activations after its forward and recompute
them in the backward.

``apply_activation_checkpointing(module, mode)`` wraps the forward of chosen submodules
with ``torch.utils.checkpoint`` (non-reentrant):

- ``"full"``: keep only the block's input; the whole forward runs again in the backward.
- ``"selective"``: keep the outputs of the GEMMs and attention kernels (the expensive
  ops, see :data:`SAVED_OPS`), recompute the cheap ones (norms, activations, dropout,
  residual adds) — torch's selective checkpointing policy.

``mode`` is one of :data:`MODES` (applied to each entry of the model's ``layers``, the
transformer blocks of raytp's models) or a dict ``{pattern: mode}`` matched one dotted
part at a time, as plans are (``{"blocks.*": "full"}``).

The recompute replays the forward exactly: torch's RNG states are restored by
``torch.utils.checkpoint`` and the model's :class:`~raytp.random.RNGTracker` regions
(which TP dropout draws from) are set back to where they were when the block first ran,
then put back after. Collectives inside a block run again in the recompute, on every
rank in the same order (the backward's order); they recompute the same values, and the
backward of each region op runs once, from the original graph.

A compiled submodule (``compile=True``, :mod:`raytp.compile`) is checkpointed
(``"full"`` only) around its compiled call, by torch's reentrant checkpoint
(:class:`CheckpointedCompiled`): the checkpoint itself runs eager, and the recompute
calls the same compiled code again. So the RNG replay above holds as in eager mode (torch's generator
states are set back before the recompute; the TP regions' forks are graph breaks that
run eager), and the collectives between the compiled graphs run eager, counted, once in
the forward and once in the recompute, as without compile. (Compiling a block that holds
the checkpoint instead would put torch's checkpoint, its RNG contexts and the graph
breaks of the collectives inside one Dynamo frame.)
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from contextlib import ExitStack, contextmanager

import torch
from torch import nn
from torch.utils import checkpoint as ckpt

from raytp.parallelize import match_patterns
from raytp.random import RNGTracker

log = logging.getLogger(__name__)

MODES = ("full", "selective")
_MARK = "_raytp_activation_checkpointing"

_SAVED_OP_NAMES = ("mm", "addmm", "bmm", "baddbmm", "_scaled_mm", "_scaled_dot_product_flash_attention",
                   "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention",
                   "_scaled_dot_product_flash_attention_for_cpu")
# the ops whose outputs selective checkpointing keeps: GEMMs and fused attention kernels
SAVED_OPS = tuple(getattr(torch.ops.aten, name).default for name in _SAVED_OP_NAMES
                  if hasattr(torch.ops.aten, name))


def check_mode(value) -> None:
    """Raise a ValueError naming ``value`` unless it is None, one of :data:`MODES`, or a
    non-empty dict of pattern strings to modes."""
    if value is None or value in MODES:
        return
    if not isinstance(value, Mapping) or not value:
        raise ValueError(f"activation_checkpointing={value!r} must be None, one of {MODES}, or a "
                         "non-empty dict {module-name pattern: mode}")
    for pattern, mode in value.items():
        if not isinstance(pattern, str) or mode not in MODES:
            raise ValueError(f"activation_checkpointing[{pattern!r}] = {mode!r}: patterns are strings "
                             f"and modes one of {MODES}")


def choose(module: nn.Module, mode) -> dict[str, str]:
    """``{submodule name: mode}`` that ``mode`` selects in ``module``; a ValueError names
    a pattern that matches nothing (with the closest names), a name two patterns match,
    or one nested inside another chosen one."""
    check_mode(mode)
    if isinstance(mode, str):
        if not isinstance(getattr(module, "layers", None), nn.ModuleList):
            raise ValueError(f"activation_checkpointing={mode!r} applies to the transformer blocks "
                             f"(module.layers) of raytp's models; {type(module).__name__} has none: "
                             "pass a dict {pattern: mode}, e.g. {'blocks.*': 'full'}")
        mode = {"layers.*": mode}
    chosen = match_patterns(module, mode, "activation_checkpointing",
                            lambda pattern, names: f"close names: {_close(pattern, names)}")
    for name in chosen:
        outer = [o for o in chosen if name.startswith(o + ".")]
        if outer:
            raise ValueError(f"activation_checkpointing: {name!r} is inside {outer[0]!r}; checkpoint one")
    return chosen


def _close(pattern: str, names: list[str]) -> list[str]:
    import difflib

    return difflib.get_close_matches(pattern, names, n=5, cutoff=0.3) or names[:8]


def apply_activation_checkpointing(module: nn.Module, mode) -> dict[str, str]:
    """Checkpoint the submodules ``mode`` selects (see the module docstring); returns
    ``{name: mode}``. The parameter names do not change (the forward is wrapped in place)."""
    if mode is None:
        return {}
    chosen = choose(module, mode)
    tracker = getattr(module, "rng", None)
    tracker = tracker if isinstance(tracker, RNGTracker) else None
    for name, m in chosen.items():
        sub = module.get_submodule(name)
        if getattr(sub, _MARK, None):
            raise ValueError(f"{name!r} is checkpointed already")
        compiled = getattr(sub, "_compiled_call_impl", None)  # nn.Module.compile's (raytp.compile)
        if compiled is not None:  # the checkpoint around the compiled call: see the module docstring
            if m != "full":
                raise ValueError(f"activation_checkpointing={m!r} of the compiled {name!r}: only 'full' "
                                 "checkpoints a compiled block (selective's policy sees no op inside a "
                                 "compiled graph; inductor's partitioner already recomputes the cheap "
                                 "ops there): use 'full', or compile=False")
            sub._compiled_call_impl = CheckpointedCompiled(compiled, tracker)
        else:
            sub.forward = Checkpointed(sub.forward, m, tracker)
        setattr(sub, _MARK, m)
    log.info("activation checkpointing: %d submodules (%s)", len(chosen), sorted(set(chosen.values())))
    return chosen


class Checkpointed:
    """A forward run under ``torch.utils.checkpoint`` (non-reentrant) when it builds a
    graph; as it was under ``no_grad`` or with a KV cache (decoding appends to it)."""

    def __init__(self, forward, mode: str, tracker: RNGTracker | None):
        if mode not in MODES:
            raise ValueError(f"mode={mode!r} is not one of {MODES}")
        self.forward, self.mode, self.tracker = forward, mode, tracker

    def __call__(self, *args, **kwargs):
        if not torch.is_grad_enabled() or kwargs.get("kv_cache") is not None or _has_cache(args):
            return self.forward(*args, **kwargs)
        return ckpt.checkpoint(self.forward, *args, use_reentrant=False, preserve_rng_state=True,
                               context_fn=self._contexts, **kwargs)

    def _contexts(self):
        """(forward context, recompute context): the tracker's states at the forward are
        set again for the recompute; selective mode adds torch's caching contexts."""
        snapshot = dict(self.tracker.states) if self.tracker is not None else None
        fwd, rec = [], [_replay(self.tracker, snapshot)]
        if self.mode == "selective":
            f, r = ckpt.create_selective_checkpoint_contexts(_policy)
            fwd.append(f)
            rec.append(r)
        return _stack(fwd), _stack(rec)


class CheckpointedCompiled:
    """A compiled module call under torch's reentrant checkpoint (``"full"``): the forward
    runs without a graph, keeping only the inputs; the backward calls the compiled code
    again with a graph and back-propagates through it. (The non-reentrant checkpoint
    recomputes with Dynamo disabled, so it would compare eager recomputed tensors with the
    compiled forward's.) The TP RNG regions are set back for the recompute here; torch's
    generators by the checkpoint. Keyword arguments are passed through, not differentiated."""

    def __init__(self, compiled, tracker: RNGTracker | None):
        self.compiled, self.tracker = compiled, tracker

    def __call__(self, *args, **kwargs):
        if not torch.is_grad_enabled() or kwargs.get("kv_cache") is not None or _has_cache(args):
            return self.compiled(*args, **kwargs)
        snapshot = dict(self.tracker.states) if self.tracker is not None else None
        calls = []

        def run(_anchor, *inputs):
            if not calls:  # the forward, without a graph
                calls.append(1)
                return self.compiled(*inputs, **kwargs)
            with _replay(self.tracker, snapshot):
                return self.compiled(*inputs, **kwargs)

        # the reentrant checkpoint's output needs an input that requires grad, or the block's
        # parameters get none (a first block fed by data): an empty one, always
        device = next((a.device for a in args if isinstance(a, torch.Tensor)), None)
        anchor = torch.empty(0, device=device, requires_grad=True)
        return ckpt.checkpoint(run, anchor, *args, use_reentrant=True, preserve_rng_state=True)


def _has_cache(args) -> bool:
    from raytp.nn import KVCache

    return any(isinstance(a, KVCache) for a in args)


def _policy(ctx, op, *args, **kwargs):
    if op in SAVED_OPS:
        return ckpt.CheckpointPolicy.MUST_SAVE
    return ckpt.CheckpointPolicy.PREFER_RECOMPUTE


@contextmanager
def _replay(tracker: RNGTracker | None, snapshot: dict | None):
    """Inside: ``tracker``'s regions as in ``snapshot``; after: as they were before."""
    if tracker is None:
        yield
        return
    now = dict(tracker.states)
    tracker.states.update(snapshot)
    try:
        yield
    finally:
        tracker.states.clear()
        tracker.states.update(now)


@contextmanager
def _stack(contexts):
    with ExitStack() as stack:
        for c in contexts:
            stack.enter_context(c)
        yield
