"""Calls submitted to every rank, and batches in the object store."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import ray


class PutBatch(NamedTuple):
    """A batch in the object store: its id and the object each rank reads, in rank order."""

    id: int
    refs: list


class Pending:
    """One call submitted to every rank.

    ``result()`` waits for every rank and returns the phase's result: the per-rank
    results in rank order, or what ``finish`` makes of them (a training step's
    cluster-wide summary, an evaluation's mean over DP groups). A rank's failure is a
    :class:`~raytp.driver.errors.RankError` naming the rank and the phase.
    """

    def __init__(self, cluster, refs: list, phase: str,
                 finish: Callable[[list], Any] | None = None, after: list[Pending] | None = None):
        self.cluster, self.refs, self.phase = cluster, refs, phase
        self._finish = finish
        self._after = after or []  # the phases this one continues (a step's forward, backward)
        self._done = False
        self._value: Any = None

    def result(self) -> Any:
        if not self._done:
            # A forward that failed on a rank is that rank's error, named "forward", rather
            # than the "step() without forward()" that its step then raises.
            for earlier in self._after:
                earlier.result()
            try:
                results = self.cluster._wait(self.refs, self.phase)
            except Exception:  # raised once, here: history and metrics() do not raise it again
                self.cluster._unread = [p for p in self.cluster._unread if p is not self]
                raise
            self._value = self._finish(results) if self._finish else results
            self._done = True
        return self._value

    def done(self) -> bool:
        ready, _ = ray.wait(self.refs, num_returns=len(self.refs), timeout=0)
        return len(ready) == len(self.refs)


