"""``StepLog``: the driver's record of training steps — every rank's metrics row, one
summary per step, and the submitted steps whose metrics are not read yet."""

from __future__ import annotations

import numpy as np

from actors.telemetry import record_stragglers
from raytp.metrics import summarize_step


class StepLog:
    """Rows (a step's metrics on one rank, with its ``rank`` and ``straggler`` flag) and
    the history (one summary per step, see :func:`raytp.metrics.summarize_step`). A
    training step's results join when read; :meth:`drain` reads every step submitted."""

    def __init__(self, tp: int, world_size: int):
        self.tp, self.world_size = tp, world_size
        self._rows: list[dict] = []
        self._history: list[dict] = []
        self._unread: list = []  # submitted training steps (Pending), oldest first

    def record(self, results: list[dict]) -> dict:
        """A step's per-rank metrics in, its summary out."""
        summary = summarize_step(results, self.tp)
        slow = summary["stragglers"]
        self._rows.extend({**row, "rank": rank, "straggler": rank in slow}
                          for rank, row in enumerate(results))
        self._history.append(summary)
        record_stragglers(slow, self.world_size)
        return summary

    def expect(self, pending) -> None:
        """``pending``, a submitted training step, joins the log when read (or drained)."""
        self._unread.append(pending)

    def forget(self, pending) -> None:
        """``pending`` failed: its error is raised once, where it was read, not again."""
        self._unread = [p for p in self._unread if p is not pending]

    def drain(self) -> None:
        """Read every submitted step (raising the first failure)."""
        while self._unread:
            self._unread.pop(0).result()

    def discard_unread(self) -> None:
        """Drop the submitted steps of a group that is gone."""
        self._unread = []

    def truncate(self, position: int) -> None:
        """Drop the steps from ``position`` on: a recovery runs them again."""
        self._history = [h for h in self._history if h["step"] < position]
        self._rows = [r for r in self._rows if r["step"] < position]

    def rows(self) -> list[dict]:
        self.drain()
        return list(self._rows)

    def history(self) -> list[dict]:
        self.drain()
        return list(self._history)


def mean_over_dp(results: list[dict], tp: int) -> dict:
    """The mean over DP groups of each value of the TP leaders' results (an evaluation)."""
    leaders = results[::tp]
    return {k: float(np.mean([r[k] for r in leaders])) for k in leaders[0]}


def plot_timeline(cluster, path: str, steps: int | None = None) -> str:
    """Where the time went, per rank and phase, in the last ``steps`` steps (all when
    None), drawn into the PNG file ``path`` (:func:`raytp.timeline.plot_timeline`)."""
    from raytp.timeline import plot_timeline as plot  # matplotlib, only when asked for

    return plot(cluster.metrics(), path, steps=steps)
