"""Per-rank step metrics: phase timers, throughput, FLOPs, memory.

Pure PyTorch: the rank computes these; the driver only aggregates them.
"""

from __future__ import annotations

import resource
import statistics
import time
from contextlib import contextmanager

import torch

# Dense bf16/fp16 tensor-core peak per GPU (FLOP/s), from the vendors' datasheets.
PEAK_FLOPS = {
    "H200": 989e12,
    "H100": 989e12,
    "A100": 312e12,
    "L40S": 362e12,
    "A10G": 125e12,
}


def peak_flops(device: torch.device) -> float | None:
    """The datasheet dense matrix peak of ``device``, or None when unknown (CPUs)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((flops for key, flops in PEAK_FLOPS.items() if key in name), None)


def peak_memory_bytes(device: torch.device) -> int:
    """Peak allocated device memory since the last reset (CUDA), or the process's peak RSS."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


class PhaseTimer:
    """Wall time of named phases. On CUDA the phases are bracketed with events and read
    at :meth:`collect`, so timing adds no synchronization inside a step."""

    def __init__(self, device: torch.device):
        self.device = device
        self._open: dict[str, tuple] = {}
        self.seconds: dict[str, float] = {}

    @contextmanager
    def phase(self, name: str):
        if self.device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end.record()
            self._open[name] = (start, end)
        else:
            t0 = time.perf_counter()
            yield
            self.seconds[name] = time.perf_counter() - t0

    def collect(self) -> dict[str, float]:
        """Seconds of every phase since the last collect (waits for CUDA events)."""
        for name, (start, end) in self._open.items():
            end.synchronize()
            self.seconds[name] = start.elapsed_time(end) / 1e3
        out, self.seconds, self._open = self.seconds, {}, {}
        return out


def count_params(model: torch.nn.Module) -> int:
    """Parameters of the full (unsharded) model, each counted once."""
    from raytp.params import get_spec

    total = 0
    for p in model.parameters():
        spec = get_spec(p)
        total += spec.global_shape.numel() if spec is not None else p.numel()
    return total


def flops_per_item(model: torch.nn.Module) -> float:
    """Training FLOPs per token (or per sample): the model's own count when it has one,
    else 6 x parameters (forward 2N, backward 4N)."""
    own = getattr(model, "num_flops_per_token", None)
    return float(own()) if callable(own) else 6.0 * count_params(model)


def throughput(items: int, seconds: float, flops_per: float, tp_size: int,
               device: torch.device) -> dict[str, float | None]:
    """Items/s of this rank's TP group, and the model FLOP/s and MFU of one of its GPUs."""
    if seconds <= 0:
        return {"items_per_s": None, "tflops": None, "mfu": None}
    flops_per_gpu = flops_per * items / seconds / tp_size
    peak = peak_flops(device)
    return {
        "items_per_s": items / seconds,
        "tflops": flops_per_gpu / 1e12,
        "mfu": flops_per_gpu / peak if peak else None,
    }


# what RankEngine reports for every step; other keys come from the loss function
STEP_KEYS = {"step", "loss", "step_s", "forward_s", "backward_s", "optim_s", "samples", "tokens",
             "samples_per_s", "tokens_per_s", "tflops", "mfu", "grad_norm", "peak_mem_bytes",
             "comm_bytes", "comm_s", "collectives", "rank", "stragglers", "t_begin", "t_end",
             "host_s", "idle_s", "phase_starts", "forward_comm_s", "backward_comm_s", "optim_comm_s",
             "skipped", "straggler", "lr"}
PHASES = ("forward", "backward", "optim")


def summarize_step(rows: list[dict], tp_size: int) -> dict:
    """One step of the whole cluster from its per-rank rows (in rank order): the slowest
    rank's time, the DP groups' mean loss and summed throughput, the largest memory."""
    leaders = rows[::tp_size]  # TP rank 0 of each DP group; a TP group shares its loss
    step_s = max(r["step_s"] for r in rows)
    summary = {
        "step": rows[0]["step"],
        "loss": _mean(r["loss"] for r in leaders),
        "step_s": step_s,
        "samples_per_s": sum(r["samples"] for r in leaders) / step_s if step_s > 0 else None,
        "tokens_per_s": sum(r["tokens"] for r in leaders) / step_s if step_s > 0 else None,
        "tflops": _mean(r["tflops"] for r in rows),
        "mfu": _mean(r["mfu"] for r in rows),
        "grad_norm": leaders[0]["grad_norm"],
        "lr": leaders[0].get("lr"),  # the same on every rank
        "comm_bytes": max(r["comm_bytes"] for r in rows),
        "peak_mem_bytes": max(r["peak_mem_bytes"] for r in rows),
    }
    for phase in ("forward_s", "backward_s", "optim_s"):
        if phase in rows[0]:
            summary[phase] = max(r[phase] for r in rows)
    summary["stragglers"] = stragglers(rows)
    summary["skipped"] = any(r.get("skipped") for r in rows)  # a non-finite loss: no optimizer step
    idle = [r["idle_s"] for r in rows if r.get("idle_s") is not None]
    summary["idle_s"] = max(idle) if idle else None  # the longest a rank waited for the driver
    for key in set(rows[0]) - STEP_KEYS:  # the loss function's extras, e.g. accuracy
        if isinstance(rows[0][key], (int, float)):
            summary[key] = _mean(r[key] for r in leaders)
    return summary


def stragglers(rows: list[dict], margin: float = 0.25, min_seconds: float = 0.005,
               min_share: float = 0.1) -> list[int]:
    """Ranks whose busy time in some phase exceeds the median of the other ranks' by more
    than ``margin`` (a fraction), ``min_seconds``, and ``min_share`` of the step (the
    slowest rank's ``step_s``): the rank the others wait for, long enough to matter.

    A phase's busy time is its time less the host time spent inside blocking collectives
    (``{phase}_comm_s``), where a rank waits for a slower one: on CPU ranks, the rank
    that waits for a straggler is not flagged with it. (NCCL collectives do not block
    the host, so on GPUs the phase times count whole.)"""
    slow = set()
    step_s = max((r.get("step_s") or 0.0 for r in rows), default=0.0)
    least = max(min_seconds, min_share * step_s)
    for phase in PHASES:
        times = [_busy(r, phase) for r in rows]
        if len(rows) < 2 or any(t is None for t in times):
            continue
        for rank, t in enumerate(times):
            median = statistics.median(times[:rank] + times[rank + 1:])
            if t > median * (1 + margin) and t - median > least:
                slow.add(rank)
    return sorted(slow)


def _busy(row: dict, phase: str) -> float | None:
    seconds = row.get(f"{phase}_s")
    return None if seconds is None else seconds - (row.get(f"{phase}_comm_s") or 0.0)


def _mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def _nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def memory_bytes(model: torch.nn.Module, optimizer, masters: list | None,
                 device: torch.device) -> dict[str, int]:
    """Bytes one rank holds in ``model``'s parameters and gradients, ``optimizer``'s state
    tensors and the master weights ``masters`` (if any); on CUDA also everything the
    caching allocator has handed out (``allocated_bytes``)."""
    params = list(model.parameters())
    states = optimizer.state.values() if optimizer is not None else ()
    out = {"param_bytes": _nbytes(params),
           "grad_bytes": _nbytes(p.grad for p in params if p.grad is not None),
           "optimizer_bytes": _nbytes(t for state in states for t in state.values()
                                      if isinstance(t, torch.Tensor))}
    if masters is not None:
        out["master_bytes"] = _nbytes(masters)
    if device.type == "cuda":
        out["allocated_bytes"] = torch.cuda.memory_allocated(device)
    return out
