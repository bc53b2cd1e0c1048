"""One rank's part of ``raytp bench``: build the contenders of each workload, time them
interleaved, and return the raw per-rank measurements.

Pure PyTorch: the same :func:`run_rank` runs inside the Ray rank actors
(:mod:`raytp.driver.bench`) and under ``torchrun`` (:mod:`raytp.bench.torchrun_entry`).
:func:`raytp.bench.report.combine` turns the per-rank results into rows.

Interleaving: the MLP and block contenders are all built, then timed in ``rounds``
rounds, each contender in turn running its share of the steps (after ``warmup``
untimed steps in the first round, one in later rounds), so that slow drifts of the
host hit every contender alike. The GPT contenders are built, timed and freed one at
a time, so that each one's memory is its own.

Every failure of a contender is agreed on by all ranks (one all-reduce), so a
contender that cannot run on some rank is skipped on all of them; the run goes on.
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import platform
import warnings
from dataclasses import dataclass

import torch

from raytp.bench import contenders as C
from raytp.bench.timing import agree, barrier, synchronize, time_steps, warm_up
from raytp.bench.workloads import Workload, select
from raytp.comm import count_collectives
from raytp.mesh import DeviceMesh
from raytp.metrics import peak_flops, peak_memory_bytes, reset_peak_memory
from raytp.params import get_spec
from raytp.placement import Replicate

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BenchOptions:
    """What to run: workload kinds or names (``None``: all), MLP hidden / block token
    sizes to keep, the contenders, and the iteration counts. ``dtype`` defaults to
    bfloat16 on CUDA and float32 on CPU."""

    workloads: tuple[str, ...] | None = None
    sizes: tuple[int, ...] | None = None
    contenders: tuple[str, ...] = C.CONTENDERS
    quick: bool = False
    warmup: int = 5
    iters: int = 20
    rounds: int = 4
    seed: int = 0
    exposed_comm: bool = True
    dtype: str | None = None

    def __post_init__(self):
        unknown = sorted(set(self.contenders) - set(C.CONTENDERS))
        if unknown or not self.contenders:
            raise ValueError(f"contenders {list(self.contenders)}: choose from {list(C.CONTENDERS)}")
        for name in ("warmup", "iters", "rounds"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < (0 if name == "warmup" else 1):
                raise ValueError(f"BenchOptions: {name}={value!r} is out of range")
        select(list(self.workloads) if self.workloads else None, list(self.sizes or ()), self.quick)

    def selected(self) -> list[Workload]:
        return select(list(self.workloads) if self.workloads else None, list(self.sizes or ()), self.quick)

    def torch_dtype(self, device: torch.device) -> torch.dtype:
        if self.dtype is not None:
            return getattr(torch, self.dtype)
        return torch.bfloat16 if device.type == "cuda" else torch.float32

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> BenchOptions:
        tuples = ("workloads", "sizes", "contenders")
        return cls(**{k: tuple(v) if k in tuples and v is not None else v for k, v in d.items()})


def run_rank(mesh: DeviceMesh, options: BenchOptions) -> dict:
    """Every selected workload on this rank; the raw per-rank measurements."""
    device = mesh.device
    ctx = C.RankContext(mesh, options.torch_dtype(device), options.seed)
    out = {"rank": mesh.rank, "tp": mesh.tp_size, "device": str(device), "device_name": device_name(device),
           "peak_flops": peak_flops(device), "torch": torch.__version__, "dtype": str(ctx.dtype),
           "options": options.to_dict(), "workloads": []}
    try:
        for w in options.selected():
            if mesh.rank == 0:
                log.info("bench: %s", w.label)
            entries = _run_workload(w, ctx, options)
            out["workloads"].append({"name": w.name, "kind": w.kind, "label": w.label, "flops": w.flops(),
                                     "tokens": w.tokens, "spec": dataclasses.asdict(w), "entries": entries})
    finally:
        ctx.close()
    return out


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()})"


def _plan(options: BenchOptions) -> list[str]:
    """The contenders, then the raytp baselines without collectives that they need."""
    names = list(options.contenders)
    if options.exposed_comm:
        flags = sorted({C.overlap_of(n) for n in names if n in C.RAYTP})
        names += [C.NO_COMM[f] for f in flags]
    return names


def _run_workload(w: Workload, ctx: C.RankContext, options: BenchOptions) -> dict[str, dict]:
    inputs = C.make_inputs(w, ctx.device, ctx.dtype, ctx.seed)
    names = _plan(options)
    entries = {n: {"status": "ok", "reason": None, "times_ms": [], "overlap": None} for n in names}
    together = w.kind != "gpt"
    for group in [names] if together else [[n] for n in names]:
        live = {n: _build_agreed(n, w, ctx, inputs, entries[n]) for n in group}
        live = {n: inst for n, inst in live.items() if entries[n]["status"] == "ok"}
        reset_peak_memory(ctx.device)
        _time_rounds(live, ctx, options, entries, options.rounds if together else 1)
        peak = peak_memory_bytes(ctx.device) if ctx.device.type == "cuda" and not together else None
        for name, inst in live.items():
            _extras(name, inst, ctx, entries[name], peak)
        live.clear()
        gc.collect()
        if ctx.device.type == "cuda":
            torch.cuda.empty_cache()
    return entries


def _runs_here(name: str, ctx: C.RankContext) -> bool:
    return name != "one-gpu" or ctx.mesh.tp_rank == 0


def _build_agreed(name, w, ctx, inputs, entry) -> C.Instance | None:
    inst, failure = None, None
    if _runs_here(name, ctx):
        try:
            inst = C.build(name, w, ctx, inputs)
            entry["overlap"] = inst.overlap
        except C.Skip as e:
            failure = ("skipped", str(e))
        except Exception as e:  # noqa: BLE001 - reported in the results, the run goes on
            log.exception("building %s for %s failed", name, w.name)
            failure = ("error", f"{type(e).__name__}: {e}")
    _settle(entry, failure, ctx)
    return inst


def _settle(entry: dict, failure: tuple[str, str] | None, ctx: C.RankContext) -> None:
    """Agree with the other ranks whether the contender is still ok."""
    if agree(failure is None, ctx.device):
        return
    status, reason = failure or ("other-rank", "failed on another rank")
    entry.update(status=status, reason=reason)


def _split(total: int, parts: int) -> list[int]:
    parts = max(1, min(parts, total))
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


def _time_rounds(live, ctx, options, entries, rounds: int) -> None:
    for r, n in enumerate(_split(options.iters, rounds)):
        for name, inst in live.items():
            if entries[name]["status"] != "ok":
                continue
            barrier(ctx.device)
            failure = None
            if inst is not None:
                try:
                    warm_up(inst.step, options.warmup if r == 0 else 1, ctx.device)
                    entries[name]["times_ms"] += time_steps(inst.step, n, ctx.device)
                except Exception as e:  # noqa: BLE001
                    log.exception("timing %s failed", name)
                    failure = ("error", f"{type(e).__name__}: {e}")
            _settle(entries[name], failure, ctx)


def _extras(name, inst, ctx, entry, peak) -> None:
    """One more step counting its collectives, and the memory of the model state."""
    if entry["status"] != "ok":
        return
    barrier(ctx.device)
    failure = None
    if inst is not None:
        try:
            entry.update(_count_step(name, inst, ctx.device))
            if inst.optimizer is not None:
                entry["memory"] = {**state_bytes(inst.module, inst.optimizer), "peak_step_bytes": peak}
        except Exception as e:  # noqa: BLE001
            log.exception("counting collectives of %s failed", name)
            failure = ("error", f"{type(e).__name__}: {e}")
    _settle(entry, failure, ctx)


def _count_step(name, inst, device) -> dict:
    if inst.mesh is not None:  # raytp: every collective goes through raytp.comm
        with count_collectives() as counter:
            inst.step()
        synchronize(device)
        return {"collectives": counter.by_kind(), "comm_bytes": counter.total_bytes}
    if name == "torch-tp":
        from torch.distributed.tensor.debug import CommDebugMode

        with warnings.catch_warnings(), CommDebugMode() as mode:
            warnings.simplefilter("ignore")  # its module hooks warn about inputs without gradients
            inst.step()
        synchronize(device)
        counts = mode.get_comm_counts()
        return {"collectives": {getattr(k, "__name__", str(k)): v for k, v in counts.items()}}
    return {}


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def _nbytes(t) -> int:
    if not isinstance(t, torch.Tensor):
        return 0
    t = _local(t)
    return t.numel() * t.element_size()


def _replicated(p: torch.Tensor) -> bool:
    """Whole on every TP rank: a replicated torch DTensor, a raytp Replicate() parameter,
    or a plain parameter."""
    if hasattr(p, "placements"):
        return all(pl.is_replicate() for pl in p.placements)
    spec = get_spec(p)
    return spec is None or isinstance(spec.placement, Replicate)


def state_bytes(module: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """Bytes of this rank's parameters and optimizer state, and of the part of them held
    whole on every rank (replicated parameters and their state)."""
    params = optim = replicated = 0
    for p in module.parameters():
        p_bytes = _nbytes(p)
        s_bytes = sum(_nbytes(v) for v in optimizer.state.get(p, {}).values())
        params, optim = params + p_bytes, optim + s_bytes
        if _replicated(p):
            replicated += p_bytes + s_bytes
    return {"param_bytes": params, "optim_bytes": optim, "state_bytes": params + optim,
            "replicated_state_bytes": replicated}


def forward_outputs(mesh: DeviceMesh, w: Workload, names=C.CONTENDERS, *, seed: int = 0,
                    dtype: torch.dtype = torch.float32) -> dict[str, tuple[torch.Tensor, float]]:
    """Each contender's full forward output and loss on this rank (``one-gpu`` built on
    every rank), for checking that they compute the same function. Skipped ones are left out."""
    ctx = C.RankContext(mesh, dtype, seed)
    inputs = C.make_inputs(w, mesh.device, dtype, seed)
    out = {}
    try:
        for name in names:
            try:
                inst = C.build(name, w, ctx, inputs)
            except C.Skip:
                continue
            output, loss = inst.forward()
            out[name] = (output.detach().cpu(), float(loss))
    finally:
        ctx.close()
    return out
