"""One rank's state and phases: what a rank actor (or a torchrun script) drives.

``RankEngine`` holds the model shard, the optimizer (None on an inference-only rank)
and the loss function, and runs the phases of a step — forward, backward, optimizer
step — returning a small metrics dict from each. It knows nothing of Ray: the driver
reaches every public method through ``RankActor.execute``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from torch import nn

from raytp.checkpoint import load_rank, save_rank
from raytp.dtensor import gather_parameter
from raytp.engine import accumulate
from raytp.engine.batches import BatchFeed, batch_items, default_loss
from raytp.engine.clock import StepClock
from raytp.engine.spec import ON_NAN
from raytp.inference import GenerationOptions, Generator, Request
from raytp.mesh import DeviceMesh
from raytp.metrics import flops_per_item, memory_bytes, peak_memory_bytes, reset_peak_memory, throughput
from raytp.optim import clip_grad_norm_, grad_norm, poison_grads_if_nonfinite_, sync_grads
from raytp.precision import MasterWeights
from raytp.random import rng_state, set_rng_state
from raytp.schedules import Schedule, base_lrs, set_lr_

log = logging.getLogger(__name__)

LossFn = Callable[[nn.Module, Mapping[str, torch.Tensor]], Any]


class NonFiniteLoss(FloatingPointError):
    """A step's loss or gradient norm was NaN or infinite (``on_nan="raise"``)."""


NO_OPTIMIZER = ("{phase}() on a rank built without an optimizer: build(..., optimizer=None) is "
                "inference-only (forward, evaluate, run, gather); build with optimizer=raytp.AdamW(...) "
                "to train")


class InferenceOnly(RuntimeError):
    """A training phase on a rank built without an optimizer."""


class RankEngine:
    """The phases of training on one rank.

    ``forward(batch)`` computes the loss and keeps the graph; ``backward()``
    back-propagates; ``step()`` syncs gradients (TP partial sums, DP mean), clips
    them to ``max_grad_norm`` and steps the optimizer, then returns the metrics of the
    whole step. ``evaluate(batch)`` runs the forward without gradients.

    A step whose loss or global gradient norm is NaN or infinite does not step the
    optimizer: with ``on_nan="raise"`` it raises :class:`NonFiniteLoss` naming the step,
    with ``"skip"`` it drops the gradients and reports ``"skipped": True``.

    With ``micro_batches=k > 1`` (:mod:`raytp.engine.accumulate`) ``forward`` runs the
    forward and backward of the first k - 1 micro-batches and the forward of the last,
    whose backward is ``backward()``'s; the step syncs the gradients once. With
    ``masters`` (:mod:`raytp.precision`) the optimizer steps the master weights, and
    checkpoints and exports hold them (:attr:`weights`).

    With ``optimizer=None`` the rank is inference-only: its parameters do not require
    grad, ``forward`` and ``evaluate`` run without a graph, and ``backward``, ``step``
    and ``train_step`` raise :class:`InferenceOnly`. ``generate_steps`` generates on
    either kind of rank (``generation``: the cache's options, :mod:`raytp.inference`).
    """

    def __init__(self, mesh: DeviceMesh, model: nn.Module, optimizer: torch.optim.Optimizer | None,
                 loss_fn: LossFn | None = None, *, max_grad_norm: float | None = None,
                 on_nan: str = "raise", lr_schedule: Schedule | None = None,
                 masters: MasterWeights | None = None, micro_batches: int = 1,
                 generation: GenerationOptions | None = None):
        if on_nan not in ON_NAN:
            raise ValueError(f"on_nan={on_nan!r} must be one of {ON_NAN}")
        self.on_nan = on_nan
        self.mesh, self.model, self.optimizer = mesh, model, optimizer
        if optimizer is None:
            model.requires_grad_(False)  # no gradient buffers, no graph kept
        self.loss_fn = loss_fn or default_loss
        self.max_grad_norm = max_grad_norm
        self.lr_schedule, self._base_lrs = lr_schedule, base_lrs(optimizer) if optimizer is not None else []
        self.masters, self.micro_batches = masters, micro_batches
        self._to_backward: torch.Tensor | None = None  # what backward() back-propagates
        self._grad_scale = 1.0  # what the step multiplies the gradients by (accumulation)
        self.flops_per_item = flops_per_item(model)
        self.clock = StepClock(mesh.device)
        self.step_count = 0
        self._loss: torch.Tensor | None = None
        self._pending: dict[str, Any] = {}
        self.feed = BatchFeed(mesh.device, mesh.streams.data)
        self.phase: str | None = None  # the phase running now (read by RankActor.where)
        self.generation = Generator(model, mesh, generation, keep=optimizer is None)

    def _compute_loss(self, batch):
        return accumulate.loss_parts(self.loss_fn(self.model, batch), batch)

    def _micro_batches(self, batch, backward: bool) -> tuple[torch.Tensor, dict[str, Any]]:
        """The whole batch's loss and extras over its micro-batches; with ``backward``, all
        but the last back-propagated (that one is left for :meth:`backward`)."""
        done = accumulate.run(self._compute_loss, batch, self.micro_batches,
                              self._backward_of if backward else None)
        self._to_backward, self._grad_scale = done.to_backward, done.grad_scale
        return done.loss, done.extras

    def _backward_of(self, loss: torch.Tensor) -> None:
        loss.backward()
        if self.masters is not None:
            self.masters.accumulate_grads()  # summed in master_dtype, micro-batch after micro-batch

    def _grad_params(self) -> list[torch.Tensor]:
        """The tensors whose gradients the optimizer steps: the masters, or the model's."""
        return self.masters.grad_params() if self.masters is not None else list(self.model.parameters())

    @property
    def weights(self):
        """What checkpoints and exports hold: the model, or (mixed precision) its master
        weights under the model's names (:meth:`raytp.precision.MasterWeights.view`)."""
        return self.masters.view() if self.masters is not None else self.model

    @contextmanager
    def _named(self, name: str):
        """``phase`` is ``name`` meanwhile (what ``RankActor.where`` reports)."""
        self.phase = name
        try:
            yield
        finally:
            self.phase = None

    @contextmanager
    def _phase(self, name: str):
        """Time the phase and count its collectives into this step's totals."""
        with self._named(name), self.clock.phase(name):
            yield

    def prefetch(self, batch: Mapping[str, Any], batch_id: int) -> None:
        """Start copying the batch that the next step will use (on the data stream)."""
        self.feed.prefetch(batch, batch_id)

    @property
    def trains(self) -> bool:
        """Whether this rank was built with an optimizer."""
        return self.optimizer is not None

    def _need_optimizer(self, phase: str) -> None:
        if self.optimizer is None:
            raise InferenceOnly(NO_OPTIMIZER.format(phase=phase))

    def forward(self, batch: Mapping[str, Any], batch_id: int | None = None) -> dict[str, Any]:
        """The loss of ``batch``, kept with its graph for :meth:`backward` (without a
        graph on an inference-only rank)."""
        reset_peak_memory(self.mesh.device)
        self.clock.begin()
        self.model.train(self.trains)  # an inference-only rank's forward runs as evaluate's
        batch = self.feed.get(batch, batch_id)
        with self._phase("forward"), torch.set_grad_enabled(self.trains):
            self._loss, extras = self._micro_batches(batch, backward=self.trains)
        self._pending.update(batch_items=batch_items(batch), extras=extras)
        return {"phase": "forward"}

    def backward(self) -> dict[str, Any]:
        self._need_optimizer("backward")
        if self._loss is None:
            raise RuntimeError("backward() without a forward(): call forward(batch) first")
        with self._phase("backward"):
            if self._to_backward is not None:
                self._backward_of(self._to_backward)
            self._to_backward = None
        return {"phase": "backward"}

    def step(self) -> dict[str, Any]:
        self._need_optimizer("step")
        if self._loss is None:
            raise RuntimeError("step() without forward() and backward()")
        with self._phase("optim"):
            params = self._grad_params()
            accumulate.scale_grads_(params, self._grad_scale)
            poison_grads_if_nonfinite_(params, self._loss)
            norm = self._sync_grads_and_norm(params)
            finite = bool(torch.isfinite(norm))  # the same on every rank: the norm is global
            lr = set_lr_(self.optimizer, self._base_lrs, self.lr_schedule, self.step_count)
            if finite:
                self.optimizer.step()
                if self.masters is not None:
                    self.masters.to_model()
            self.optimizer.zero_grad(set_to_none=True)
        if not finite and self.on_nan == "raise":
            raise self._drop_step(norm)
        metrics = {**self._step_metrics(norm), "skipped": not finite, "lr": lr}
        if not finite:
            log.warning("step %d skipped: loss %s, gradient norm %s", self.step_count, metrics["loss"],
                        metrics["grad_norm"])
        self._loss, self._pending = None, {}
        self.step_count += 1
        return metrics

    def _sync_grads_and_norm(self, params: list[torch.Tensor]) -> torch.Tensor:
        """Whole gradients of ``params`` (TP partial sums, DP mean; in the precision
        policy's ``reduce_dtype``), clipped to ``max_grad_norm``; their global norm. A
        DP-sharded optimizer (:mod:`raytp.zero`) reduce-scatters them instead."""
        sharded = getattr(self.optimizer, "sync_grads_and_norm", None)
        if sharded is not None:
            return sharded(self.max_grad_norm)
        if self.masters is not None:
            self.masters.sync_grads(self.mesh)
        else:
            sync_grads(params, self.mesh)
        return (clip_grad_norm_(params, self.max_grad_norm, self.mesh) if self.max_grad_norm
                else grad_norm(params, self.mesh))

    def _drop_step(self, norm) -> NonFiniteLoss:
        """Forget the step that is not taken; the error that names it."""
        loss, step = self._loss.item(), self.step_count
        self.clock.finish()
        self._loss, self._pending = None, {}
        if not np.isfinite(loss):
            return NonFiniteLoss(f"loss is {loss} at step {step}; the optimizer step was not taken "
                                 "(build(..., on_nan='skip') skips such steps)")
        return NonFiniteLoss(f"the gradient norm is {norm.item()} at step {step} (loss {loss:.6g}); the "
                             "optimizer step was not taken (build(..., on_nan='skip') skips such steps)")

    def train_step(self, batch: Mapping[str, Any], batch_id: int | None = None,
                   next_batch: Mapping[str, Any] | None = None, next_id: int | None = None):
        """Forward, backward and step; the copy of ``next_batch`` (the next step's) starts
        once this step's forward is queued, so that it overlaps the backward."""
        self._need_optimizer("train_step")
        self.forward(batch, batch_id)
        if next_batch is not None:
            self.prefetch(next_batch, next_id)
        self.backward()
        return self.step()

    def loop_train_steps(self, batch: Mapping[str, Any], steps: int) -> float:
        """``steps`` training steps on one batch with no driver in the loop; their wall
        time in seconds (the control-plane baseline of ``raytp bench``)."""
        start = time.perf_counter()
        for _ in range(steps):
            self.train_step(batch)
        return time.perf_counter() - start

    @torch.no_grad()
    def evaluate(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        self.model.eval()
        batch = self.feed.now(batch)  # keeps any prefetched batch
        loss, extras = self._micro_batches(batch, backward=False)
        return {"loss": loss.item(), **extras}

    def generate_steps(self, requests: list[Request], max_steps: int, **options) -> dict[str, Any]:
        """Continuous-batching generation, one call of the driver's loop: ``requests`` join
        the queue, then up to ``max_steps`` decode steps; the (prompt index, id) events
        decided meanwhile (:meth:`raytp.inference.Generator.steps`, which says the
        ``options``). Every rank of a TP group is called with the same arguments."""
        with self._named("generate"):
            return self.generation.steps(requests, max_steps, **options)

    def memory_bytes(self) -> dict[str, int]:
        """Bytes this rank holds in parameters, gradients, optimizer state and master
        weights (and, on CUDA, everything the caching allocator has handed out)."""
        masters = self.masters.masters if self.masters is not None else None
        return memory_bytes(self.model, self.optimizer, masters, self.mesh.device)

    def gather(self, name: str) -> torch.Tensor:
        """The full parameter ``name`` on the CPU, from this rank's DTensor view of it (the
        master's values under mixed precision; :func:`raytp.dtensor.gather_parameter`,
        collective over the TP group)."""
        return gather_parameter(self.weights, name, self.mesh)

    # -- checkpoints ----------------------------------------------------------------------

    def save_shard(self, directory: str) -> dict[str, Any]:
        """This rank's part of a checkpoint save: its file (DP rank 0 only) and, on rank 0,
        the index's description of the run (see :func:`raytp.checkpoint.save_rank`)."""
        with self._named("save"):
            return save_rank(directory, self.weights, self.optimizer, self.mesh, step=self.step_count)

    def load_checkpoint(self, path: str) -> dict[str, Any]:
        """Load model, optimizer state, step and RNG states from a checkpoint saved at any tp;
        returns ``{"step", "data_position", "extra"}``."""
        with self._named("load"):
            weights = self.weights  # under mixed precision with ZeRO-1, the masters gathered over DP
            state = load_rank(path, weights, self.optimizer, self.mesh)
            if self.masters is not None:
                self.masters.to_model(weights)
        self.step_count = state["step"]
        self._loss, self._pending = None, {}
        return state

    def rng_state(self) -> dict[str, torch.Tensor]:
        """The RNG states this rank draws from (torch's, and the model's RNGTracker if any)."""
        return rng_state(getattr(self.model, "rng", None), self.mesh.device)

    def set_rng_state(self, states: dict[str, torch.Tensor]) -> None:
        set_rng_state(states, getattr(self.model, "rng", None), self.mesh.device, same_tp_rank=True)

    def export_hf(self, directory: str, dtype: str | None = None) -> bool:
        """Write the model (its master weights under mixed precision) as a Hugging Face
        checkpoint, in ``dtype`` (None: as held). Collective; rank 0 writes."""
        from raytp.models.hf_export import export_hf

        return export_hf(self.weights, self.mesh, directory, dtype=dtype)

    def _step_metrics(self, norm) -> dict[str, Any]:
        seconds, host = self.clock.finish()
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
            **host,
            **self._pending["extras"],
        }
        return metrics
