"""Surviving rank failures: periodic checkpoints, and the replay of the batches since
the last one after the ranks are rebuilt.

``fit`` keeps every batch it has taken from the user's iterable that the last good
checkpoint does not cover. When a rank dies or hangs, the cluster tears the group
down, :meth:`TPCluster.recover` rebuilds it and loads that checkpoint (model,
optimizer, step, RNG states, data position), and ``fit`` replays the kept batches from
the checkpoint's data position: the losses that follow are those of an uninterrupted
run, and no step before the checkpoint is lost.
"""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import ray

from raytp.driver import health
from raytp.driver.errors import RankDied, RankError, RankHung

log = logging.getLogger(__name__)


@dataclass
class RecoveryPolicy:
    """``max_failures`` rank failures are survived; a checkpoint is saved to
    ``checkpoint_dir`` every ``checkpoint_every`` steps (the last ``keep`` are kept)."""

    max_failures: int = 0
    checkpoint_dir: str | None = None
    checkpoint_every: int = 0
    keep: int = 2

    def __post_init__(self):
        for name in ("max_failures", "checkpoint_every", "keep"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"{name}={value!r} must be a non-negative integer")
        if self.checkpoint_every and not self.checkpoint_dir:
            raise ValueError(f"checkpoint_every={self.checkpoint_every} needs a checkpoint_dir")
        if self.max_failures and not self.checkpoint_every:
            raise ValueError(f"max_failures={self.max_failures} needs checkpoint_dir and "
                             "checkpoint_every: the steps since the last checkpoint are replayed")

    def due(self, steps_done: int) -> bool:
        return bool(self.checkpoint_every) and steps_done % self.checkpoint_every == 0

    def path(self, data_position: int) -> Path:
        return Path(self.checkpoint_dir) / f"step-{data_position:08d}"

    def latest(self) -> Path | None:
        """The newest complete checkpoint (a directory with its index; a save that died
        midway left only a temporary directory, which is skipped)."""
        if not self.checkpoint_dir or not Path(self.checkpoint_dir).is_dir():
            return None
        done = sorted(p for p in Path(self.checkpoint_dir).glob("step-*")
                      if p.is_dir() and (p / "checkpoint.json").is_file() and "." not in p.name)
        return done[-1] if done else None

    def prune(self) -> None:
        done = sorted(p for p in Path(self.checkpoint_dir).glob("step-*") if "." not in p.name)
        for old in done[:-self.keep] if self.keep else []:
            shutil.rmtree(old, ignore_errors=True)


class Replay:
    """The batches taken from the user's iterable, numbered by data position (from 0 at
    the start of ``fit``): those the last checkpoint covers are dropped, the others are
    handed out again after a rewind."""

    def __init__(self, source, keep: bool):
        self.source = iter(source)
        self.keep = keep  # only when failures can be survived: otherwise nothing is replayed
        self.kept: dict[int, dict] = {}
        self.taken = 0  # batches taken from the source so far
        self.position = 0  # the data position of the next batch to hand out

    def next(self):
        """The next batch (a replayed one first), or None at the end."""
        if self.position < self.taken:
            batch = self.kept[self.position]
        else:
            batch = next(self.source, None)
            if batch is None:
                return None
            if self.keep:
                self.kept[self.taken] = batch
            self.taken += 1
        self.position += 1
        return batch

    def covered(self, position: int) -> None:
        """A checkpoint now holds every batch before ``position``."""
        for old in [p for p in self.kept if p < position]:
            del self.kept[old]

    def rewind(self, position: int) -> None:
        missing = [p for p in range(position, self.taken) if p not in self.kept]
        if position < 0 or missing:
            raise RuntimeError(f"cannot resume at data position {position} of this fit(): the "
                               f"checkpoint predates the batches fit() kept")
        self.position = position


def tear_down(cluster, error: Exception) -> Exception:
    """After a rank failure: name where each rank is (a stall), abort the communicators
    of the ranks that still answer, end every actor and free the placement group; record
    the failure in ``cluster.failures``. Returns the error to raise."""
    at = time.time()
    if isinstance(error, RankDied):
        gone = [error.rank]
    else:
        report, gone = health.diagnose(cluster.actors, error.phase)
        error = RankHung(error.phase, error.ranks, error.timeout_s, report)
    ranks = [error.rank] if isinstance(error, RankDied) else error.ranks
    _end_group(cluster, error, ranks, at, gone)
    return error


def _end_group(cluster, error: Exception, ranks: list[int], at: float, gone: list[int]) -> None:
    """Abort the communicators of the ranks that still answer (all but ``gone``), end
    every actor and free the placement group; record the failure in ``cluster.failures``."""
    health.abort([a for rank, a in enumerate(cluster.actors) if rank not in gone])
    cluster._teardown(grace_s=0)  # a stuck phase would hold up a graceful shutdown
    cluster.failures.append({"error": str(error).splitlines()[0], "phase": error.phase, "ranks": ranks,
                             "at": at, "torn_down_s": time.time() - at, "recovered": False})
    log.error("%s; the ranks were torn down", str(error).splitlines()[0])


SETTLE_S = 5.0  # how long the other ranks may take to end a phase in which one raised


def settle(cluster, error: RankError, refs: list) -> RankError:
    """After ``error`` (an exception a rank raised itself): the other ranks get
    ``SETTLE_S`` to end the phase. Those still in it then wait in a collective that the
    failed rank will never join; rather than leave them there until the deadline, the
    group is torn down as after a hang, and the error says where they were and that
    ``recover()`` rebuilds the ranks. Returns the error to raise."""
    _, running = ray.wait(refs, num_returns=len(refs), timeout=SETTLE_S)
    if not running:
        return error
    at = time.time()
    stuck = sorted(refs.index(r) for r in running)
    report, gone = health.diagnose(cluster.actors, error.phase)
    note = (f"{error.message}; ranks {stuck} were still in {error.phase} {SETTLE_S:g}s later ({report}), "
            "so the group was torn down: call recover() to rebuild it from the last checkpoint, or close()")
    failed = RankError(error.rank, error.phase, note, error.remote_traceback)
    failed.cause = error.cause
    _end_group(cluster, failed, [error.rank], at, gone)
    return failed


def rebuild(cluster) -> dict:
    """New ranks for ``cluster``, built as before, from its last good checkpoint."""
    start = time.monotonic()
    cluster._teardown()
    cluster._start()
    cluster._unread, cluster._built = [], False
    if cluster._build_args is not None:
        cluster.build(**cluster._build_args)
    checkpoint = cluster.recovery.latest()
    if checkpoint is not None and cluster._built:
        cluster.load(str(checkpoint))
    position = cluster.data_position
    # the steps the failure undid are run again: drop their metrics
    cluster._history = [h for h in cluster._history if h["step"] < position]
    cluster._rows = [r for r in cluster._rows if r["step"] < position]
    for failure in cluster.failures:  # a failure while recovering is recovered from with it
        if not failure["recovered"]:
            failure.update(recovered=True, recovery_s=time.time() - failure["at"], resumed_at=position)
    log.warning("recovered from %s at data position %d in %.1fs",
                checkpoint or "the initial weights", position, time.monotonic() - start)
    return {"checkpoint": str(checkpoint) if checkpoint else None, "data_position": position}
