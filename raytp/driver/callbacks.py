"""Callbacks of ``fit(..., callbacks=[...])``: code of the user's that runs on the driver
at each step, evaluation and checkpoint, e.g. live logging to a tracker.

A callback is any object with some of these methods (a missing one is not called):

- ``on_step(summary)``: after each step's metrics are read; ``summary`` is the step's
  entry of ``cluster.history`` (``step``, ``loss``, ``lr``, ``grad_norm``, throughput,
  memory; ``eval_loss`` when the step was evaluated).
- ``on_eval(summary)``: after ``on_step`` of a step that was evaluated.
- ``on_checkpoint(path)``: after ``fit`` saved a checkpoint at ``path``.

Subclass :class:`Callback` to get no-op defaults. A step replayed after a recovery is
reported again. An exception in a callback ends ``fit`` (the ranks stay usable).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

HOOKS = ("on_step", "on_eval", "on_checkpoint")


class Callback:
    """No-op defaults of the three hooks."""

    def on_step(self, summary: dict[str, Any]) -> None:
        pass

    def on_eval(self, summary: dict[str, Any]) -> None:
        pass

    def on_checkpoint(self, path: str) -> None:
        pass


def check_callbacks(callbacks: Sequence) -> list:
    """``callbacks`` as a list; a TypeError for one with none of the hooks."""
    if not isinstance(callbacks, Sequence) or isinstance(callbacks, str):
        raise TypeError(f"callbacks must be a list of objects with {', '.join(HOOKS)}; got "
                        f"{type(callbacks).__name__}")
    for cb in callbacks:
        if not any(callable(getattr(cb, hook, None)) for hook in HOOKS):
            raise TypeError(f"callback {cb!r} has none of the methods {', '.join(HOOKS)}; subclass "
                            "raytp.driver.callbacks.Callback and override the ones you need")
    return list(callbacks)


def notify(callbacks: Sequence, hook: str, arg) -> None:
    """Call ``hook(arg)`` on every callback that has it, in order."""
    for cb in callbacks:
        method = getattr(cb, hook, None)
        if callable(method):
            method(arg)
