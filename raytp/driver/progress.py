"""The ``fit`` loop: pipelined steps under a progress bar."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from itertools import islice
from typing import Any

from tqdm.auto import tqdm

log = logging.getLogger(__name__)


def _postfix(summary: dict) -> dict[str, str]:
    shown = {"loss": f"{summary['loss']:.4f}"}
    if summary.get("tokens_per_s") and summary.get("tokens_per_s") != summary.get("samples_per_s"):
        shown["tok/s"] = f"{summary['tokens_per_s']:,.0f}"
    elif summary.get("samples_per_s"):
        shown["samples/s"] = f"{summary['samples_per_s']:,.0f}"
    if summary.get("stragglers"):
        shown["slow"] = ",".join(f"r{r}" for r in summary["stragglers"])
    if summary.get("eval_loss") is not None:
        shown["eval"] = f"{summary['eval_loss']:.4f}"
    return shown


def fit_loop(cluster, batches: Iterable[Mapping[str, Any]], *, steps: int | None,
             eval_batch: Mapping[str, Any] | None, eval_every: int, progress: bool) -> list[dict]:
    """Submit step k+1 (and the evaluation due after it), then read step k, so that the
    ranks always have work queued.

    On KeyboardInterrupt the work already submitted is allowed to finish, so the model
    on the ranks stays consistent and the cluster usable; the interrupt is then
    re-raised. Closing the cluster (``with`` or ``close()``) frees the ranks.
    """
    total = steps if steps is not None else (len(batches) if hasattr(batches, "__len__") else None)
    bar = tqdm(total=total, desc="train", unit="step", disable=not progress, dynamic_ncols=True)
    summaries, in_flight = [], None
    try:
        for i, (put, following) in enumerate(_with_next(cluster, islice(batches, steps))):
            step = cluster.submit_train_step(put, prefetch=following)
            due = eval_batch is not None and eval_every and (i + 1) % eval_every == 0
            submitted = (step, cluster.submit_evaluate(eval_batch) if due else None)
            if in_flight is not None:
                summaries.append(_finish(in_flight, bar))
            in_flight = submitted
        if in_flight is not None:
            summaries.append(_finish(in_flight, bar))
            in_flight = None
    except KeyboardInterrupt:
        if in_flight is not None:
            log.warning("interrupted: letting the submitted step finish")
            for pending in filter(None, in_flight):
                pending.result()
        raise
    finally:
        bar.close()
    return summaries


def _with_next(cluster, batches):
    """(this batch, the next one), each put into the object store once."""
    it = iter(batches)
    first = next(it, None)
    current = cluster.put_batch(first) if first is not None else None
    while current is not None:
        following = next(it, None)
        following = cluster.put_batch(following) if following is not None else None
        yield current, following
        current = following


def _finish(in_flight, bar) -> dict:
    step, evaluation = in_flight
    summary = step.result()
    if evaluation is not None:
        summary["eval_loss"] = evaluation.result()["loss"]
    bar.set_postfix(_postfix(summary), refresh=False)
    bar.update(1)
    return summary
