"""The ``fit`` loop: pipelined steps under a progress bar, periodic checkpoints, callbacks,
resuming after a loaded checkpoint, and recovery from rank failures (see
:mod:`raytp.driver.recovery`)."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from itertools import islice
from typing import Any

from tqdm.auto import tqdm

from raytp.driver.callbacks import check_callbacks, notify
from raytp.driver.errors import RECOVERABLE, ClusterFailed
from raytp.driver.recovery import Replay
from raytp.driver.tensorboard import TensorBoardLogger

log = logging.getLogger(__name__)


def _postfix(summary: dict) -> dict[str, str]:
    shown = {"loss": f"{summary['loss']:.4f}"}
    if summary.get("tokens_per_s") and summary.get("tokens_per_s") != summary.get("samples_per_s"):
        shown["tok/s"] = f"{summary['tokens_per_s']:,.0f}"
    elif summary.get("samples_per_s"):
        shown["samples/s"] = f"{summary['samples_per_s']:,.0f}"
    if summary.get("lr") is not None:
        shown["lr"] = f"{summary['lr']:.3g}"
    if summary.get("stragglers"):
        shown["slow"] = ",".join(f"r{r}" for r in summary["stragglers"])
    if summary.get("eval_loss") is not None:
        shown["eval"] = f"{summary['eval_loss']:.4f}"
    return shown


def fit_loop(cluster, batches: Iterable[Mapping[str, Any]], *, steps: int | None,
             eval_batch: Mapping[str, Any] | None, eval_every: int, progress: bool,
             log_dir: str | None = None, callbacks: Sequence = (), skip: int = 0) -> list[dict]:
    """Submit step k+1 (and the evaluation due after it), then read step k, so that the
    ranks always have work queued. The first ``skip`` batches (those a loaded checkpoint
    covers) are drawn and dropped; ``steps`` counts them too, so that a resumed run
    ends where the uninterrupted one does. Saves a checkpoint whenever the data position
    is a multiple of ``checkpoint_every`` (named ``step-<data position>``: the steps
    completed since build); after a rank failure, rebuilds the ranks from the last one and
    replays the batches since (at most ``max_failures`` times). Each step's summary,
    evaluation and checkpoint go to ``callbacks`` (:mod:`raytp.driver.callbacks`; with
    ``log_dir``, a :class:`TensorBoardLogger` too). Returns one summary per step.

    On KeyboardInterrupt the work already submitted is allowed to finish, so the model
    on the ranks stays consistent and the cluster usable; the interrupt is then
    re-raised. Closing the cluster (``with`` or ``close()``) frees the ranks.
    """
    callbacks = check_callbacks(callbacks)
    if not isinstance(skip, int) or skip < 0 or (steps is not None and steps < 0):
        raise ValueError(f"skip={skip!r} and steps={steps!r} must be non-negative integers")
    total = steps if steps is not None else (len(batches) if hasattr(batches, "__len__") else None)
    if total is not None:
        total = max(0, total - skip)
    if skip:
        log.info("resuming: skipping the first %d batches (the checkpoint's data position)", skip)
    bar = tqdm(total=total, desc="train", unit="step", disable=not progress, dynamic_ncols=True)
    replay = Replay(islice(batches, skip, steps), keep=cluster.recovery.max_failures > 0)
    owned = [TensorBoardLogger(log_dir)] if log_dir is not None else []
    run = _Run(cluster, replay, bar, eval_batch, eval_every, [*callbacks, *owned])
    try:
        while True:
            try:
                run.train()
                break
            except RECOVERABLE as error:
                _recover(cluster, replay, bar, error, run.base)
                run.saved_at = cluster.data_position
    finally:
        bar.close()
        for logger in owned:
            logger.close()
    return [run.summaries[k] for k in sorted(run.summaries)]


class _Run:
    def __init__(self, cluster, replay, bar, eval_batch, eval_every, callbacks):
        self.cluster, self.replay, self.bar, self.callbacks = cluster, replay, bar, callbacks
        self.eval_batch, self.eval_every = eval_batch, eval_every
        self.base = cluster.data_position  # the data position where this fit() started
        self.saved_at = self.base  # the data position of the last checkpoint this fit() saw
        self.summaries: dict[int, dict] = {}

    def train(self) -> None:
        cluster, in_flight = self.cluster, None
        current = self._put(self.replay.next())
        try:
            while current is not None:
                if self._checkpoint_due():  # after exactly the steps its name says: wait for them
                    in_flight = self._finish(in_flight)
                    self._checkpoint()
                following = self._put(self.replay.next())
                step = cluster.submit_train_step(current, prefetch=following)
                done = cluster.data_position - self.base
                due = self.eval_batch is not None and self.eval_every and done % self.eval_every == 0
                submitted = (step, cluster.submit_evaluate(self.eval_batch) if due else None)
                self._finish(in_flight)
                in_flight, current = submitted, following
            in_flight = self._finish(in_flight)
            if self._checkpoint_due():
                self._checkpoint()
        except KeyboardInterrupt:
            if in_flight is not None:
                log.warning("interrupted: letting the submitted step finish")
                for pending in filter(None, in_flight):
                    pending.result()
            raise

    def _put(self, batch):
        return self.cluster.put_batch(batch) if batch is not None else None

    def _finish(self, in_flight) -> None:
        """Read a submitted step (and its evaluation); tell the callbacks. Returns None."""
        if in_flight is None:
            return None
        step, evaluation = in_flight
        summary = step.result()
        if evaluation is not None:
            summary["eval_loss"] = evaluation.result()["loss"]
        self.summaries[summary["step"]] = summary
        notify(self.callbacks, "on_step", summary)
        if evaluation is not None:
            notify(self.callbacks, "on_eval", summary)
        self.bar.set_postfix(_postfix(summary), refresh=False)
        self.bar.update(1)
        return None

    def _checkpoint_due(self) -> bool:
        position = self.cluster.data_position
        return position > self.saved_at and self.cluster.recovery.due(position)

    def _checkpoint(self) -> None:
        policy, position = self.cluster.recovery, self.cluster.data_position
        path = self.cluster.save(str(policy.path(position)))
        self.saved_at = position
        self.replay.covered(position - self.base)
        policy.prune()
        log.info("checkpoint %s", path)
        notify(self.callbacks, "on_checkpoint", path)


def _recover(cluster, replay: Replay, bar, error: Exception, base: int) -> None:
    """Rebuild the ranks from the last checkpoint and rewind the batches to it; past
    ``max_failures``, close the cluster and raise :class:`ClusterFailed`."""
    while True:
        allowed = cluster.recovery.max_failures
        if len(cluster.failures) > allowed:
            cluster.close()
            raise ClusterFailed(f"{str(error).splitlines()[0]}: that is failure {len(cluster.failures)} "
                                f"with max_failures={allowed}; the cluster is closed") from error
        log.warning("recovering from: %s", str(error).splitlines()[0])
        try:
            cluster.recover()
            break
        except RECOVERABLE as again:
            error = again
        except Exception as cause:  # e.g. no room for the new group, an unreadable checkpoint
            cluster.close()
            raise ClusterFailed(f"{str(error).splitlines()[0]}: recovering from it failed "
                                f"({type(cause).__name__}: {cause}); the cluster is closed") from cause
    replay.rewind(cluster.data_position - base)
    bar.n = replay.position
    bar.refresh()
