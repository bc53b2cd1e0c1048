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
        """``checkpoint_dir/step-<data position, 8 digits>``: named by the steps completed
        since build (``checkpoint_every=10``: ``step-00000010``, ``step-00000020``)."""
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


def rebuild(cluster) -> dict:
    """New ranks for ``cluster``, built from the same spec, from its last good checkpoint;
    the steps the failure undid are run again (their metrics are dropped) and the
    failures are marked recovered."""
    start = time.monotonic()
    cluster.group.restart()
    cluster.steps.discard_unread()
    checkpoint = cluster.recovery.latest()
    if cluster.spec is not None:
        cluster.build(cluster.spec)
        if checkpoint is not None:
            cluster.load(str(checkpoint))
    position = cluster.data_position
    cluster.steps.truncate(position)
    cluster.group.mark_recovered(position)
    log.warning("recovered from %s at data position %d in %.1fs",
                checkpoint or "the initial weights", position, time.monotonic() - start)
    return {"checkpoint": str(checkpoint) if checkpoint else None, "data_position": position}


def resume(cluster) -> dict:
    """Load the last good checkpoint of ``cluster.recovery.checkpoint_dir`` into the built
    model, as a new driver does after the old one died; the next ``fit`` skips the batches
    it covers. Returns ``{"checkpoint", "data_position", "step", "extra"}``; with no
    checkpoint yet, ``checkpoint`` is None and training starts at data position 0."""
    if not cluster.recovery.checkpoint_dir:
        raise ValueError("resume() needs TPCluster(..., checkpoint_dir=...): the directory fit() "
                         "saves its checkpoints in (with checkpoint_every=N)")
    if not cluster.built:
        raise RuntimeError("resume() before build(): build the same model first (cluster.build(...)), "
                           "then resume() loads its last checkpoint")
    checkpoint = cluster.recovery.latest()
    if checkpoint is None:
        log.info("resume(): no checkpoint in %s yet: starting at data position 0",
                 cluster.recovery.checkpoint_dir)
        return {"checkpoint": None, "data_position": cluster.data_position, "step": None, "extra": None}
    state = cluster.load(str(checkpoint))
    log.info("resumed from %s at data position %d", checkpoint, state["data_position"])
    return {"checkpoint": str(checkpoint), **state}
