"""One rank's training state and phases: what a rank actor (or a torchrun script) drives.

``RankEngine`` holds the model shard, the optimizer and the loss function, and
runs the phases of a step — forward, backward, optimizer step — returning a small
metrics dict from each. It knows nothing of Ray.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from raytp.checkpoint import load_rank, save_rank
from raytp.comm import count_collectives
from raytp.mesh import DeviceMesh
from raytp.metrics import PhaseTimer, flops_per_item, peak_memory_bytes, reset_peak_memory, throughput
from raytp.optim import clip_grad_norm_, grad_norm, poison_grads_if_nonfinite_, sync_grads
from raytp.random import rng_state, set_rng_state
from raytp.streams import copy_to_device

log = logging.getLogger(__name__)

LossFn = Callable[[nn.Module, Mapping[str, torch.Tensor]], Any]
ON_NAN = ("raise", "skip")  # what a step does when its loss or gradient norm is not finite


class NonFiniteLoss(FloatingPointError):
    """A step's loss or gradient norm was NaN or infinite (``on_nan="raise"``)."""


def default_loss(model: nn.Module, batch: Mapping[str, torch.Tensor]):
    """``model.loss(batch)`` when the model has one; else cross-entropy of ``model(x)``
    against ``y``, with the accuracy as an extra metric."""
    if hasattr(model, "loss"):
        return model.loss(batch)
    if "x" not in batch or "y" not in batch:
        raise ValueError(f"the default loss needs batch keys 'x' and 'y' (got {sorted(batch)}); "
                         "pass loss_fn=... to build()")
    logits = model(batch["x"])
    loss = F.cross_entropy(logits, batch["y"])
    return loss, {"accuracy": (logits.argmax(-1) == batch["y"]).float().mean().item()}


def to_device(batch: Mapping[str, Any], device: torch.device, stream=None):
    """Tensors on ``device`` from a dict of numpy arrays or CPU tensors, and the copies
    the compute stream must wait for. On CUDA they are copied from pinned memory on
    ``stream`` (the data stream), so they can be issued ahead of use."""
    if not isinstance(batch, Mapping) or not batch:
        raise ValueError(f"a batch is a non-empty dict of arrays, got {type(batch).__name__}")
    out, pending = {}, []
    for key, value in batch.items():
        if isinstance(value, np.ndarray):
            value = torch.from_numpy(np.array(value))  # the object store's arrays are read-only
        elif not isinstance(value, torch.Tensor):
            value = torch.as_tensor(value)
        out[key], work = copy_to_device(value, device, stream)
        if work is not None:
            pending.append(work)
    return out, pending


def batch_items(batch: Mapping[str, torch.Tensor]) -> tuple[int, int]:
    """(samples, tokens) in a batch: tokens are the elements of ``input_ids`` if present."""
    first = next(iter(batch.values()))
    samples = int(first.shape[0]) if first.dim() else 1
    ids = batch.get("input_ids")
    return samples, int(ids.numel()) if ids is not None else samples


class RankEngine:
    """The phases of training on one rank.

    ``forward(batch)`` computes the loss and keeps the graph; ``backward()``
    back-propagates; ``step()`` syncs gradients (TP partial sums, DP mean), clips
    them to ``max_grad_norm`` and steps the optimizer, then returns the metrics of the
    whole step. ``evaluate(batch)`` runs the forward without gradients.

    A step whose loss or global gradient norm is NaN or infinite does not step the
    optimizer: with ``on_nan="raise"`` it raises :class:`NonFiniteLoss` naming the step,
    with ``"skip"`` it drops the gradients and reports ``"skipped": True``.
    """

    def __init__(self, mesh: DeviceMesh, model: nn.Module, optimizer: torch.optim.Optimizer | None,
                 loss_fn: LossFn | None = None, *, max_grad_norm: float | None = None,
                 on_nan: str = "raise"):
        if on_nan not in ON_NAN:
            raise ValueError(f"on_nan={on_nan!r} must be one of {ON_NAN}")
        self.on_nan = on_nan
        self.mesh, self.model, self.optimizer = mesh, model, optimizer
        self.loss_fn = loss_fn or default_loss
        self.max_grad_norm = max_grad_norm
        self.flops_per_item = flops_per_item(model)
        self.timer = PhaseTimer(mesh.device)
        self.step_count = 0
        self._loss: torch.Tensor | None = None
        self._pending: dict[str, Any] = {}
        self._prefetched: tuple | None = None  # (batch id, tensors, copies in flight)
        self._phase_starts: dict[str, float] = {}  # host time.time() at each phase's start
        self.phase: str | None = None  # the phase running now (read by RankActor.where)
        self._began = self._last_end = None  # host times of this step's start, the last step's end
        self._comm = {"comm_bytes": 0, "comm_s": 0.0, "collectives": 0}

    def _compute_loss(self, batch):
        out = self.loss_fn(self.model, batch)
        loss, extras = out if isinstance(out, tuple) else (out, {})
        if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
            raise TypeError(f"the loss function must return a scalar tensor, got {loss!r}")
        return loss, extras

    @contextmanager
    def _phase(self, name: str):
        """Time the phase and count its collectives into this step's totals."""
        self._phase_starts[name] = time.time()
        self.phase = name
        try:
            with self.timer.phase(name), count_collectives() as counter:
                yield
        finally:
            self.phase = None
        self._comm["comm_bytes"] += counter.total_bytes
        self._comm["comm_s"] += counter.seconds
        self._comm[f"{name}_comm_s"] = self._comm.get(f"{name}_comm_s", 0.0) + counter.seconds
        self._comm["collectives"] += counter.count()

    def prefetch(self, batch: Mapping[str, Any], batch_id: int) -> None:
        """Start copying the batch that the next step will use (on the data stream)."""
        self._prefetched = (batch_id, *to_device(batch, self.mesh.device, self.mesh.streams.data))

    def _device_batch(self, batch, batch_id) -> dict[str, torch.Tensor]:
        """The batch on this rank's device: the prefetched copy when it is this batch."""
        prefetched, self._prefetched = self._prefetched, None
        if prefetched is None or batch_id is None or prefetched[0] != batch_id:
            return self._copy_now(batch)
        tensors, pending = prefetched[1:]
        for work in pending:
            work.wait()
        return tensors

    def _copy_now(self, batch) -> dict[str, torch.Tensor]:
        tensors, pending = to_device(batch, self.mesh.device, self.mesh.streams.data)
        for work in pending:
            work.wait()
        return tensors

    def forward(self, batch: Mapping[str, Any], batch_id: int | None = None) -> dict[str, Any]:
        if self.optimizer is None:
            raise RuntimeError("forward() before build(): this rank holds no model")
        reset_peak_memory(self.mesh.device)
        self._began = time.time()
        self.model.train()
        batch = self._device_batch(batch, batch_id)
        with self._phase("forward"):
            self._loss, extras = self._compute_loss(batch)
        self._pending.update(batch_items=batch_items(batch), extras=extras)
        return {"phase": "forward"}

    def backward(self) -> dict[str, Any]:
        if self._loss is None:
            raise RuntimeError("backward() without a forward(): call forward(batch) first")
        with self._phase("backward"):
            self._loss.backward()
        return {"phase": "backward"}

    def step(self) -> dict[str, Any]:
        if self.optimizer is None:
            raise RuntimeError("step() before build(): this rank holds no model or optimizer")
        if self._loss is None:
            raise RuntimeError("step() without forward() and backward()")
        with self._phase("optim"):
            poison_grads_if_nonfinite_(self.model.parameters(), self._loss)
            sync_grads(self.model, self.mesh)
            params = self.model.parameters()
            norm = (clip_grad_norm_(params, self.max_grad_norm, self.mesh) if self.max_grad_norm
                    else grad_norm(params, self.mesh))
            finite = bool(torch.isfinite(norm))  # the same on every rank: the norm is global
            if finite:
                self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        if not finite and self.on_nan == "raise":
            raise self._drop_step(norm)
        metrics = {**self._step_metrics(norm), "skipped": not finite}
        if not finite:
            log.warning("step %d skipped: loss %s, gradient norm %s", self.step_count, metrics["loss"],
                        metrics["grad_norm"])
        self._loss, self._pending = None, {}
        self.step_count += 1
        return metrics

    def _drop_step(self, norm) -> NonFiniteLoss:
        """Forget the step that is not taken; the error that names it."""
        loss, step = self._loss.item(), self.step_count
        self.timer.collect()
        self._host_times()
        self._loss, self._pending = None, {}
        self._comm = {"comm_bytes": 0, "comm_s": 0.0, "collectives": 0}
        if not np.isfinite(loss):
            return NonFiniteLoss(f"loss is {loss} at step {step}; the optimizer step was not taken "
                                 "(build(..., on_nan='skip') skips such steps)")
        return NonFiniteLoss(f"the gradient norm is {norm.item()} at step {step} (loss {loss:.6g}); the "
                             "optimizer step was not taken (build(..., on_nan='skip') skips such steps)")

    def train_step(self, batch: Mapping[str, Any], batch_id: int | None = None,
                   next_batch: Mapping[str, Any] | None = None, next_id: int | None = None):
        """Forward, backward and step; the copy of ``next_batch`` (the next step's) starts
        once this step's forward is queued, so that it overlaps the backward."""
        self.forward(batch, batch_id)
        if next_batch is not None:
            self.prefetch(next_batch, next_id)
        self.backward()
        return self.step()

    @torch.no_grad()
    def evaluate(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        if self.optimizer is None:
            raise RuntimeError("evaluate() before build(): this rank holds no model")
        self.model.eval()
        loss, extras = self._compute_loss(self._copy_now(batch))  # keeps any prefetched batch
        return {"loss": loss.item(), **extras}

    # -- checkpoints ----------------------------------------------------------------------

    def save_shard(self, directory: str) -> dict[str, Any]:
        """This rank's part of a checkpoint save: its file (DP rank 0 only) and, on rank 0,
        the index's description of the run (see :func:`raytp.checkpoint.save_rank`)."""
        return save_rank(directory, self.model, self.optimizer, self.mesh, step=self.step_count)

    def load_checkpoint(self, path: str) -> dict[str, Any]:
        """Load model, optimizer state, step and RNG states from a checkpoint saved at any tp;
        returns ``{"step", "data_position", "extra"}``."""
        state = load_rank(path, self.model, self.optimizer, self.mesh)
        self.step_count = state["step"]
        self._loss, self._pending = None, {}
        return state

    def rng_state(self) -> dict[str, torch.Tensor]:
        """The RNG states this rank draws from (torch's, and the model's RNGTracker if any)."""
        return rng_state(getattr(self.model, "rng", None), self.mesh.device)

    def set_rng_state(self, states: dict[str, torch.Tensor]) -> None:
        set_rng_state(states, getattr(self.model, "rng", None), self.mesh.device, same_tp_rank=True)

    def export_hf(self, directory: str) -> bool:
        """Write the model as a Hugging Face checkpoint (collective; rank 0 writes)."""
        from raytp.models.hf_export import export_hf

        return export_hf(self.model, self.mesh, directory)

    def _step_metrics(self, norm) -> dict[str, Any]:
        seconds = self.timer.collect()
        step_s = sum(seconds.values())
        samples, tokens = self._pending["batch_items"]
        items = tokens if tokens != samples else samples
        rates = throughput(items, step_s, self.flops_per_item, self.mesh.tp_size, self.mesh.device)
        metrics = {
            "step": self.step_count,
            "loss": self._loss.item(),
            "step_s": step_s,
            **{f"{name}_s": s for name, s in seconds.items()},
            "samples": samples,
            "tokens": tokens,
            "samples_per_s": samples / step_s if step_s > 0 else None,
            "tokens_per_s": tokens / step_s if step_s > 0 else None,
            "tflops": rates["tflops"],
            "mfu": rates["mfu"],
            "grad_norm": norm.item(),
            "peak_mem_bytes": peak_memory_bytes(self.mesh.device),
            **self._comm,
            **self._host_times(),
            **self._pending["extras"],
        }
        self._comm = {"comm_bytes": 0, "comm_s": 0.0, "collectives": 0}
        return metrics

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
