"""Timing steps on one rank, and keeping the ranks of a run in step with each other.

On CUDA each step is bracketed by two events on the current stream and the events
are read once, after the last step (no synchronization between steps, so the CPU
may run ahead as in training; a CPU-bound step shows as GPU idle time between its
events). On CPU each step is timed with ``perf_counter``.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch
import torch.distributed as dist


def time_steps(step: Callable[[], object], n: int, device: torch.device) -> list[float]:
    """Run ``step`` ``n`` times; the milliseconds of each."""
    if n <= 0:
        return []
    if device.type != "cuda":
        out = []
        for _ in range(n):
            t0 = time.perf_counter()
            step()
            out.append((time.perf_counter() - t0) * 1e3)
        return out
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
              for _ in range(n)]
    for start, end in events:
        start.record()
        step()
        end.record()
    torch.cuda.synchronize(device)
    return [start.elapsed_time(end) for start, end in events]


def warm_up(step: Callable[[], object], n: int, device: torch.device) -> None:
    for _ in range(n):
        step()
    synchronize(device)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def barrier(device: torch.device) -> None:
    """Every rank of the world gets here, and this rank's GPU has finished its work."""
    synchronize(device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(torch.zeros(1, device=device))
    synchronize(device)


def agree(ok: bool, device: torch.device) -> bool:
    """True on every rank when ``ok`` is True on every rank (one all-reduce)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return ok
    flag = torch.tensor([1 if ok else 0], dtype=torch.int32, device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def slowest_per_step(per_rank: list[list[float]]) -> list[float]:
    """Step i of the group takes as long as its slowest rank's step i."""
    per_rank = [times for times in per_rank if times]
    return [max(step) for step in zip(*per_rank, strict=True)] if per_rank else []
