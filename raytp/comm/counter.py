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


@dataclass
class CollectiveCounter:
    """Collectives seen while the counter was active on this thread."""

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


_local = threading.local()


def _active() -> list[CollectiveCounter]:
    if not hasattr(_local, "counters"):
        _local.counters = []
        _local.tags = []
    return _local.counters


@contextmanager
def count_collectives():
    """Count the collectives issued on this thread inside the block.

    >>> with count_collectives() as c:
    ...     mlp(x).sum().backward()
    >>> c.by_kind()
    {'all_reduce': 2}
    """
    counter = CollectiveCounter()
    _active().append(counter)
    try:
        yield counter
    finally:
        _active().remove(counter)


@contextmanager
def comm_tag(tag: str):
    """Label the collectives issued inside the block (e.g. ``"block 3 MLP"``)."""
    _active()
    _local.tags.append(tag)
    try:
        yield
    finally:
        _local.tags.pop()


def backward_tag(ctx):
    """In an autograd backward: label its collectives with the tag its forward ran under
    (saved as ``ctx.tag``), so a stuck backward collective names its layer too."""
    tag = getattr(ctx, "tag", None)
    return comm_tag(f"{tag} (backward)") if tag else nullcontext()


def current_tag() -> str | None:
    _active()
    return _local.tags[-1] if _local.tags else None


def record(rec: CollectiveRecord, seconds: float = 0.0) -> None:
    for counter in _active():
        counter.counts[rec.kind] += 1
        counter.bytes[rec.kind] += rec.nbytes
        counter.seconds += seconds
        counter.records.append(rec)

