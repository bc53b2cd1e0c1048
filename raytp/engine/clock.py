"""``StepClock``: the times and collectives of one training step on a rank — device
time per phase, the host clock (start, end, idle since the last step, each phase's
start) and the bytes, count and time of the collectives each phase issued."""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Any

import torch

from raytp.comm import count_collectives
from raytp.metrics import PhaseTimer


def _no_comm() -> dict[str, Any]:
    return {"comm_bytes": 0, "comm_s": 0.0, "collectives": 0}


class StepClock:
    """Started by :meth:`begin` at a step's forward, read (and reset) by :meth:`finish`
    at its end; :meth:`phase` times one phase and counts its collectives."""

    def __init__(self, device: torch.device):
        self.timer = PhaseTimer(device)
        self._phase_starts: dict[str, float] = {}  # host time.time() at each phase's start
        self._began = self._last_end = None  # host times of this step's start, the last step's end
        self._comm = _no_comm()

    def begin(self) -> None:
        self._began = time.time()

    @contextmanager
    def phase(self, name: str):
        self._phase_starts[name] = time.time()
        with self.timer.phase(name), count_collectives() as counter:
            yield
        self._comm["comm_bytes"] += counter.total_bytes
        self._comm["comm_s"] += counter.seconds
        self._comm[f"{name}_comm_s"] = self._comm.get(f"{name}_comm_s", 0.0) + counter.seconds
        self._comm["collectives"] += counter.count()

    def finish(self) -> tuple[dict[str, float], dict[str, Any]]:
        """The step's device seconds per phase, and its host times and collectives."""
        seconds = self.timer.collect()
        comm, self._comm = self._comm, _no_comm()
        return seconds, {**comm, **self._host_times()}

    def _host_times(self) -> dict[str, Any]:
        """Host clock of the step: its start and end (``time.time()``), the wall time in
        between, each phase's start, and how long the rank sat idle since its last step
        (waiting for the driver's next call)."""
        end = time.time()
        idle = self._began - self._last_end if self._last_end is not None else None
        times = {"t_begin": self._began, "t_end": end, "host_s": end - self._began, "idle_s": idle,
                 "phase_starts": dict(self._phase_starts)}
        self._last_end, self._phase_starts = end, {}
        return times
