"""Learning-rate schedules: picklable specs of the multiplier of the optimizer's base lr.

A schedule's ``factor(step)`` is the multiplier for optimizer step ``step`` (0-based:
the first step is 0). The rank sets every param group's ``lr = base_lr * factor(step)``
before each optimizer step, ``step`` being the engine's ``step_count``, which
checkpoints save: a loaded run goes on at the lr the schedule gives there.

The shapes are torchtitan's ``linear_warmup_stable_decay`` (the multiplier that its
``LambdaLR`` applies before each step), with ``W`` warmup, ``S`` stable and ``D`` decay
steps (``W + S + D = total_steps``), ``m = min_lr_ratio`` and ``s`` the step:

- warmup, ``s < W``: ``(s + 1) / (W + 1)`` (never 0, so no step is wasted);
- stable, ``W <= s < W + S``: ``1``;
- decay, ``W + S <= s``: ``m + (1 - m) * g(p)`` with progress
  ``p = (s + 1 - W - S) / (D + 1)`` and ``g`` the decay's shape;
- past ``total_steps`` the factor stays at its value at ``total_steps``, ``m``.

Each schedule is also callable, ``schedule(step) == schedule.factor(step)``, so it can
drive ``torch.optim.lr_scheduler.LambdaLR`` in a one-device reference.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

DECAY_TYPES = ("linear", "cosine", "sqrt")


@runtime_checkable
class Schedule(Protocol):
    def factor(self, step: int) -> float: ...


def _decay_shape(kind: str, progress: float) -> float:
    """``g(p)``: 1 at p = 0 down to 0 at p = 1."""
    if kind == "linear":
        return 1.0 - progress
    if kind == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return 1.0 - math.sqrt(progress)


def _factor(step: int, warmup: int, stable: int, decay: int, kind: str, min_ratio: float) -> float:
    """torchtitan's ``linear_warmup_stable_decay`` (see the module docstring)."""
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise ValueError(f"step={step!r} must be an integer >= 0")
    step = min(step, warmup + stable + decay)
    if step < warmup:
        return (step + 1) / (warmup + 1)
    if step < warmup + stable or decay == 0:
        return 1.0
    progress = (step + 1 - warmup - stable) / (decay + 1)
    return min_ratio + (1.0 - min_ratio) * _decay_shape(kind, progress)


def _check_int(owner, name: str, value, least: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < least:
        raise ValueError(f"{type(owner).__name__}: {name}={value!r} must be an integer >= {least}")


def _check_warmup_total(owner) -> None:
    _check_int(owner, "warmup_steps", owner.warmup_steps, 0)
    _check_int(owner, "total_steps", owner.total_steps, 1)
    if owner.warmup_steps >= owner.total_steps:
        raise ValueError(f"{type(owner).__name__}: warmup_steps={owner.warmup_steps} must be less than "
                         f"total_steps={owner.total_steps}")


def _check_ratio(owner) -> None:
    ratio = owner.min_lr_ratio
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0.0 <= ratio <= 1.0:
        raise ValueError(f"{type(owner).__name__}: min_lr_ratio={ratio!r} must be in [0, 1]")


class _Callable:
    def __call__(self, step: int) -> float:
        return self.factor(step)


@dataclass(frozen=True)
class Constant(_Callable):
    """``(s + 1) / (W + 1)`` for ``s < W = warmup_steps``, then 1 (``warmup_steps=0``: 1
    throughout, the optimizer's lr unchanged)."""

    warmup_steps: int = 0

    def __post_init__(self):
        _check_int(self, "warmup_steps", self.warmup_steps, 0)

    def factor(self, step: int) -> float:
        return _factor(step, self.warmup_steps, 0, 0, "linear", 1.0)


@dataclass(frozen=True)
class _WarmupDecay(_Callable):
    """Linear warmup over ``warmup_steps``, then ``decay`` from 1 to ``min_lr_ratio`` over
    the rest of ``total_steps``."""

    warmup_steps: int
    total_steps: int
    min_lr_ratio: float = 0.0
    decay = "linear"  # a class attribute of each schedule, not a field

    def __post_init__(self):
        _check_warmup_total(self)
        _check_ratio(self)

    def factor(self, step: int) -> float:
        decay = self.total_steps - self.warmup_steps
        return _factor(step, self.warmup_steps, 0, decay, self.decay, self.min_lr_ratio)


@dataclass(frozen=True)
class WarmupCosine(_WarmupDecay):
    """Linear warmup over ``warmup_steps``, then a cosine from 1 to ``min_lr_ratio`` over
    ``D = total_steps - warmup_steps``: for ``s >= W``,
    ``m + (1 - m) * (1 + cos(pi * (s + 1 - W) / (D + 1))) / 2``; ``m`` from ``total_steps`` on."""

    decay = "cosine"


@dataclass(frozen=True)
class WarmupLinear(_WarmupDecay):
    """Linear warmup over ``warmup_steps``, then a line from 1 to ``min_lr_ratio`` over
    ``D = total_steps - warmup_steps``: for ``s >= W``, ``m + (1 - m) * (1 - (s + 1 - W) / (D + 1))``;
    ``m`` from ``total_steps`` on."""

    decay = "linear"


@dataclass(frozen=True)
class WSD(_Callable):
    """Warmup–stable–decay: linear warmup over ``warmup_steps``, 1 until the last
    ``decay_steps`` of ``total_steps``, then ``decay_type`` (``"linear"``: ``1 - p``,
    ``"cosine"``: ``(1 + cos(pi p)) / 2``, ``"sqrt"``: ``1 - sqrt(p)``) from 1 to
    ``min_lr_ratio``, with ``p = (s + 1 - (total - decay)) / (decay + 1)``; ``m`` from
    ``total_steps`` on."""

    warmup_steps: int
    total_steps: int
    decay_steps: int
    min_lr_ratio: float = 0.0
    decay_type: str = "linear"

    def __post_init__(self):
        _check_warmup_total(self)
        _check_ratio(self)
        _check_int(self, "decay_steps", self.decay_steps, 1)
        if self.warmup_steps + self.decay_steps > self.total_steps:
            raise ValueError(f"WSD: warmup_steps={self.warmup_steps} + decay_steps={self.decay_steps} must "
                             f"be at most total_steps={self.total_steps}")
        if self.decay_type not in DECAY_TYPES:
            raise ValueError(f"WSD: decay_type={self.decay_type!r} must be one of {DECAY_TYPES}")

    def factor(self, step: int) -> float:
        stable = self.total_steps - self.warmup_steps - self.decay_steps
        return _factor(step, self.warmup_steps, stable, self.decay_steps, self.decay_type, self.min_lr_ratio)


def check_schedule(schedule) -> None:
    """Refuse what is not a schedule (None is: the optimizer's lr throughout)."""
    if schedule is not None and not callable(getattr(schedule, "factor", None)):
        raise TypeError(f"lr_schedule must be a schedule with factor(step), e.g. "
                        f"raytp.schedules.WarmupCosine(100, 1000), got {type(schedule).__name__}")


def base_lrs(optimizer) -> list[float]:
    """Each param group's lr, the base the schedule multiplies (read once, at build)."""
    return [float(group["lr"]) for group in optimizer.param_groups]


def set_lr_(optimizer, bases: list[float], schedule: Schedule | None, step: int) -> float:
    """Set each param group's lr to ``base * schedule.factor(step)`` (no schedule: leave
    them); return the first group's lr, the one the step reports."""
    if schedule is not None:
        factor = float(schedule.factor(step))
        for group, base in zip(optimizer.param_groups, bases, strict=True):
            group["lr"] = base * factor
    return float(optimizer.param_groups[0]["lr"])
