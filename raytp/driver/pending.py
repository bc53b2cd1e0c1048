"""Calls submitted to every rank, and batches in the object store."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import ray

from raytp import validate
from raytp.engine.accumulate import check_micro_batches


def check_picklable(name: str, value) -> None:
    """Refuse, on the driver, a value that cannot be sent to the ranks."""
    try:
        ray.cloudpickle.dumps(value)
    except Exception as e:  # noqa: BLE001 - pickling raises anything
        raise TypeError(f"{name} cannot be pickled, so it cannot be sent to the ranks: "
                        f"{type(e).__name__}: {e}") from None


class PutBatch(NamedTuple):
    """A batch in the object store: its id and the object each rank reads, in rank order."""

    id: int
    refs: list


def put_batch(batch: Mapping[str, Any], tp: int, dp: int, checker, batch_id: int, spec=None) -> PutBatch:
    """Put ``batch`` into the object store: one copy per DP group (its slice of the batch);
    every rank of a TP group reads the same object. Refused here, with a clear error, when
    it does not fit (:mod:`raytp.validate`; ``checker`` is the model's own check or None;
    ``spec``, the ranks' BuildSpec or None before build, says the micro-batches)."""
    arrays = validate.as_arrays(batch)
    per_group = validate.check_dp(arrays, dp)
    if spec is not None:
        check_micro_batches(per_group, spec.micro_batches)
    if checker is not None:
        checker.validate_batch(arrays, tp)
    refs = [ray.put({k: v[d * per_group:(d + 1) * per_group] for k, v in arrays.items()})
            for d in range(dp)]
    return PutBatch(batch_id, [refs[rank // tp] for rank in range(tp * dp)])


class Pending:
    """One call submitted to every rank of ``group`` (a :class:`RankGroup`).

    ``result()`` waits for every rank and returns the phase's result: the per-rank
    results in rank order, or what ``finish`` makes of them (a training step's
    cluster-wide summary, an evaluation's mean over DP groups). A rank's failure is a
    :class:`~raytp.driver.errors.RankError` naming the rank and the phase. ``after`` are
    the calls this one continues (a step's forward and backward): their errors come first.
    A training step is in ``steps`` (a :class:`StepLog`) until it is read.
    """

    def __init__(self, group, refs: list, phase: str, finish: Callable[[list], Any] | None = None,
                 after: list[Pending] | None = None, steps=None):
        self.group, self.refs, self.phase = group, refs, phase
        self._finish = finish
        self._after = after or []
        self._steps = steps
        self._done = False
        self._value: Any = None
        if steps is not None:
            steps.expect(self)

    def result(self) -> Any:
        if not self._done:
            # A forward that failed on a rank is that rank's error, named "forward", rather
            # than the "step() without forward()" that its step then raises.
            for earlier in self._after:
                earlier.result()
            try:
                results = self.group.wait(self.refs, self.phase)
            except Exception:  # raised once, here: history and metrics() do not raise it again
                if self._steps is not None:
                    self._steps.forget(self)
                raise
            self._value = self._finish(results) if self._finish else results
            self._done = True
        return self._value

    def done(self) -> bool:
        ready, _ = ray.wait(self.refs, num_returns=len(self.refs), timeout=0)
        return len(ready) == len(self.refs)
