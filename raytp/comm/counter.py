"""Counting collectives: how many of each kind, how many bytes, in what order.

Every collective raytp issues goes through a :class:`~raytp.comm.backend.Communicator`,
which reports it here. Tests pin counts ("one all-reduce per row-parallel forward")
and the driver turns the totals into per-step communication metrics.
"""

from __future__ import annotations

import threading
from collections import Counter
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field


@dataclass(frozen=True)
class CollectiveRecord:
    # "all_reduce", "all_reduce_max", "all_gather", "reduce_scatter", "all_to_all", "broadcast", "scatter"
    kind: str
    group: str  # the communicator's name, e.g. "tp" or "dp"
    nbytes: int  # bytes this rank contributes
    seq: int  # per-communicator sequence number, the same on every member rank
    tag: str | None  # the caller's label (a layer name), when one is set


@dataclass(eq=False)  # by identity: nested counters with the same records are still distinct
class CollectiveCounter:
    """Collectives this process issued while the counter was active."""

    counts: Counter = field(default_factory=Counter)
    bytes: Counter = field(default_factory=Counter)
    seconds: float = 0.0  # host time inside blocking collectives
    records: list[CollectiveRecord] = field(default_factory=list)

    def count(self, kind: str | None = None, group: str | None = None) -> int:
        return sum(
            1 for r in self.records if kind in (None, r.kind) and group in (None, r.group)
        )

    def by_kind(self, group: str | None = None) -> dict[str, int]:
        return dict(Counter(r.kind for r in self.records if group in (None, r.group)))

    @property
    def total_bytes(self) -> int:
        return sum(self.bytes.values())


# The active counters are the process's, not a thread's: on GPUs autograd runs the
# backward of CUDA tensors on a thread of its own, and its collectives belong to the
# step the main thread counts. Tags are per thread (a backward names its layer itself,
# see backward_tag).
_counters: list[CollectiveCounter] = []
_counters_lock = threading.Lock()
_local = threading.local()


def _tags() -> list[str]:
    if not hasattr(_local, "tags"):
        _local.tags = []
    return _local.tags


@contextmanager
def count_collectives():
    """Count the collectives this process issues (on any thread) inside the block.

    >>> with count_collectives() as c:
    ...     mlp(x).sum().backward()
    >>> c.by_kind()
    {'all_reduce': 2}
    """
    counter = CollectiveCounter()
    with _counters_lock:
        _counters.append(counter)
    try:
        yield counter
    finally:
        with _counters_lock:
            _counters.remove(counter)


@contextmanager
def comm_tag(tag: str):
    """Label the collectives issued inside the block (e.g. ``"block 3 MLP"``)."""
    tags = _tags()
    tags.append(tag)
    try:
        yield
    finally:
        tags.pop()


def backward_tag(ctx):
    """In an autograd backward: label its collectives with the tag its forward ran under
    (saved as ``ctx.tag``), so a stuck backward collective names its layer too."""
    tag = getattr(ctx, "tag", None)
    return comm_tag(f"{tag} (backward)") if tag else nullcontext()


def current_tag() -> str | None:
    tags = _tags()
    return tags[-1] if tags else None


def record(rec: CollectiveRecord, seconds: float = 0.0) -> None:
    with _counters_lock:
        active = list(_counters)
    for counter in active:
        counter.counts[rec.kind] += 1
        counter.bytes[rec.kind] += rec.nbytes
        counter.seconds += seconds
        counter.records.append(rec)

