"""Step metrics exported through Ray's metrics API, for Prometheus and Grafana.

Each rank actor records its step metrics after every training step
(:class:`RankTelemetry`); the driver records which ranks straggled
(:func:`record_stragglers`), since only it sees every rank's times. Ray's metrics
agent on each node serves them at ``http://<node>:<metrics export port>/metrics``,
named with Ray's ``ray_`` prefix: ``ray_raytp_step_seconds{rank="0"}``.

Gauges hold the last step's value; ``raytp_steps`` and ``raytp_skipped_steps``
count. Tags: ``rank`` (the global rank) on all of them, ``phase`` (forward,
backward, optim) on ``raytp_phase_seconds``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping
from typing import Any

from ray.util import metrics as ray_metrics

log = logging.getLogger(__name__)

PHASES = ("forward", "backward", "optim")
# gauge name -> (the step metric it shows, description)
GAUGES = {
    "raytp_step_seconds": ("step_s", "Seconds of the last training step's phases on the rank"),
    "raytp_tokens_per_second": ("tokens_per_s", "Tokens (or samples) per second of the rank's TP group"),
    "raytp_loss": ("loss", "Loss of the last training step"),
    "raytp_grad_norm": ("grad_norm", "Global gradient norm of the last training step"),
    "raytp_peak_memory_bytes": ("peak_mem_bytes", "Peak device memory of the last step (CPU: peak RSS)"),
    "raytp_comm_bytes": ("comm_bytes", "Bytes the rank sent into collectives in the last step"),
    "raytp_comm_seconds": ("comm_s", "Host seconds inside blocking collectives in the last step"),
}

_metrics: dict[str, Any] = {}  # made once per process: Ray registers each name once


def _metric(kind, name: str, description: str, tag_keys: tuple[str, ...] = ("rank",)):
    if name not in _metrics:
        _metrics[name] = kind(name, description=description, tag_keys=tag_keys)
    return _metrics[name]


class RankTelemetry:
    """The metrics of one rank. A failure to record is logged once and never fails a step."""

    def __init__(self, rank: int):
        self.tags = {"rank": str(rank)}
        self._failed = False

    def record(self, step: Mapping[str, Any]) -> None:
        """Set the gauges from a step's metrics dict (:meth:`raytp.engine.RankEngine.step`)."""
        if self._failed:
            return
        try:
            self._record(step)
        except Exception:  # noqa: BLE001 - telemetry must never end a training run
            self._failed = True
            log.warning("recording metrics through Ray failed; telemetry is off on this rank",
                        exc_info=True)

    def _record(self, step: Mapping[str, Any]) -> None:
        phase = _metric(ray_metrics.Gauge, "raytp_phase_seconds",
                        "Seconds of a phase of the last training step", ("rank", "phase"))
        for name in PHASES:
            if _number(step.get(f"{name}_s")):
                phase.set(step[f"{name}_s"], tags={**self.tags, "phase": name})
        for name, (key, description) in GAUGES.items():
            if _number(step.get(key)):
                _metric(ray_metrics.Gauge, name, description).set(float(step[key]), tags=self.tags)
        _metric(ray_metrics.Counter, "raytp_steps", "Training steps run").inc(1, tags=self.tags)
        if step.get("skipped"):
            _metric(ray_metrics.Counter, "raytp_skipped_steps",
                    "Training steps skipped for a non-finite loss or gradient").inc(1, tags=self.tags)


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def record_stragglers(stragglers: Iterable[int], world_size: int) -> None:
    """Set ``raytp_straggler{rank}`` to 1 for the ranks that straggled in the last step
    and 0 for the others (from the driver, which sees every rank's times)."""
    try:
        gauge = _metric(ray_metrics.Gauge, "raytp_straggler",
                        "1 when the rank straggled in the last training step, else 0")
        slow = set(stragglers)
        for rank in range(world_size):
            gauge.set(1.0 if rank in slow else 0.0, tags={"rank": str(rank)})
    except Exception:  # noqa: BLE001 - e.g. a Ray Client driver, which exports no metrics
        log.debug("could not record the straggler gauge", exc_info=True)
