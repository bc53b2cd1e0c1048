"""What a rank is built from: one frozen, validated record the driver ships to every
rank (and a ``torchrun`` script passes to :func:`raytp.engine.build_engine`)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from raytp.activation_ckpt import check_mode, choose
from raytp.compile import CompileOptions, compile_options, select_parts
from raytp.inference.generator import GenerationOptions
from raytp.nn.kernels import OVERLAP
from raytp.optim import AdamW
from raytp.precision import MixedPrecision
from raytp.schedules import Schedule, check_schedule

log = logging.getLogger(__name__)

ON_NAN = ("raise", "skip")  # what a step does when its loss or gradient norm is not finite
DEFAULT_OPTIMIZER = AdamW()


@dataclass(frozen=True)
class BuildSpec:
    """One rank's model, loss and optimizer, and how they run.

    - ``model``: a raytp model config (it has ``build(mesh, device)``) or a picklable
      zero-argument callable returning a plain ``nn.Module``, parallelized with ``plan``
      (see :func:`raytp.parallelize`; None keeps it whole on every rank).
    - ``loss_fn(model, batch)``: a scalar loss, or ``(loss, extra_metrics)``; None uses
      the model's ``loss(batch)`` or cross-entropy of ``model(batch["x"])`` against ``y``.
      ``extra_metrics["loss_tokens"]``, if given, is how many items the loss is the mean
      of (micro-batches are weighted by it; default: the samples).
    - ``optimizer``: an optimizer spec (``raytp.AdamW``, ``raytp.SGD``), or None for an
      inference-only rank (no optimizer state, no gradients).
    - ``seed``: torch's seed on every rank before the model is made, so that tp=N holds
      exactly the shards of tp=1's weights.
    - ``max_grad_norm``: clip the global gradient norm to it (None: no clipping).
    - ``overlap``: one of :data:`raytp.nn.kernels.OVERLAP` (None: the device's default).
    - ``on_nan``: ``"raise"`` or ``"skip"`` a step whose loss or gradient norm is not finite.
    - ``lr_schedule``: a :mod:`raytp.schedules` spec; each optimizer step's lr is the
      optimizer's lr times its ``factor(step)`` (None: the optimizer's lr throughout).
    - ``precision``: a :class:`raytp.MixedPrecision` (compute in its ``param_dtype``, step
      master weights of its ``master_dtype``; see :mod:`raytp.precision`), or None.
    - ``micro_batches``: split each DP group's batch into this many micro-batches, one
      optimizer step per batch, the loss the whole batch's mean (:mod:`raytp.engine.accumulate`).
    - ``activation_checkpointing``: ``"full"`` or ``"selective"`` per transformer block of a
      raytp model, or ``{pattern: mode}`` per submodule (see :mod:`raytp.activation_ckpt`).
    - ``compile``: ``torch.compile`` each transformer block in place (True), the submodules a
      dict ``{fnmatch pattern: True}`` or a tuple of patterns names, or as a
      :class:`raytp.compile.CompileOptions` says; a plain module without blocks is compiled whole.
      Collectives stay graph breaks, counted as in eager mode (:mod:`raytp.compile`). With
      ``activation_checkpointing="full"`` each compiled block is checkpointed around its
      compiled call (:mod:`raytp.activation_ckpt`); ``"selective"`` is refused with compile.
    - ``max_batch``, ``max_len``: the KV cache of generation (``cluster.generate``), slots and
      positions per slot; None sizes them (:func:`raytp.inference.cache.size_cache`: from
      the device memory free after the weights, ``max_len`` at most the model's
      ``max_seq_len``; modest defaults on CPU). An inference-only rank makes the cache at
      build and keeps it; a training rank makes it at each generation (for its prompts,
      where None) and frees it after.
    - ``cuda_graphs``: decode steps as CUDA graphs (ignored on CPU).
    """

    model: Any
    plan: Mapping[str, str] | None = None
    loss_fn: Callable | None = None
    optimizer: Any = DEFAULT_OPTIMIZER
    seed: int = 0
    max_grad_norm: float | None = None
    overlap: bool | str | None = None
    on_nan: str = "raise"
    lr_schedule: Schedule | None = None
    precision: MixedPrecision | None = None
    micro_batches: int = 1
    activation_checkpointing: str | Mapping[str, str] | None = None
    compile: bool | Mapping | tuple | CompileOptions = False
    max_batch: int | None = None
    max_len: int | None = None
    cuda_graphs: bool = True

    def __post_init__(self):
        GenerationOptions(self.max_batch, self.max_len, self.cuda_graphs)  # a ValueError naming a bad one
        if self.on_nan not in ON_NAN:
            raise ValueError(f"on_nan={self.on_nan!r} must be one of {ON_NAN}")
        if self.overlap not in OVERLAP:
            raise ValueError(f"overlap={self.overlap!r} must be one of {OVERLAP}")
        if isinstance(self.model, nn.Module):
            name = type(self.model).__name__
            raise TypeError(f"model is an nn.Module instance ({name}); pass its class or a zero-argument "
                            f"factory instead, e.g. build({name}) or build(lambda: {name}(...)): each rank "
                            "makes its own copy and keeps its shards")
        if not (hasattr(self.model, "build") or callable(self.model)):
            raise TypeError(f"model must be a raytp model config or a zero-argument callable, "
                            f"got {type(self.model).__name__}")
        self._check_optimizer()
        options = compile_options(self.compile)  # a ValueError naming a value it does not take
        if self.activation_checkpointing == "selective" and options is not None and options.parts is None:
            raise ValueError(f"activation_checkpointing='selective' with compile={self.compile!r}: only "
                             "'full' checkpoints a compiled block (selective's policy sees no op inside a "
                             "compiled graph; inductor already recomputes the cheap ops there)")
        check_schedule(self.lr_schedule)
        if self.lr_schedule is not None and self.optimizer is None:
            raise ValueError(f"lr_schedule={self.lr_schedule!r} needs an optimizer; optimizer=None "
                             "builds inference-only ranks")
        check_mode(self.activation_checkpointing)
        if self.plan is not None and not isinstance(self.plan, Mapping):
            raise TypeError(f"plan must be a dict of module-name patterns to styles, got "
                            f"{type(self.plan).__name__}")
        if self.loss_fn is not None and not callable(self.loss_fn):
            raise TypeError(f"loss_fn must be callable as loss_fn(model, batch), got "
                            f"{type(self.loss_fn).__name__}")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise TypeError(f"seed={self.seed!r} must be an integer")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise ValueError(f"max_grad_norm={self.max_grad_norm} must be positive (or None: no clipping)")
        if not isinstance(self.micro_batches, int) or isinstance(self.micro_batches, bool) \
                or self.micro_batches < 1:
            raise ValueError(f"micro_batches={self.micro_batches!r} must be a positive integer: the "
                             "micro-batches each DP group's batch is split into")
        if self.precision is not None and not isinstance(self.precision, MixedPrecision):
            raise TypeError(f"precision must be a raytp.MixedPrecision or None, got "
                            f"{type(self.precision).__name__}")

    def _check_optimizer(self) -> None:
        opt = self.optimizer
        if isinstance(opt, type) and issubclass(opt, torch.optim.Optimizer):
            raise TypeError(f"optimizer={opt.__module__}.{opt.__name__} is a torch optimizer class; pass a "
                            "raytp optimizer spec, e.g. raytp.AdamW(lr=3e-4) or raytp.SGD(lr=0.1), which "
                            "each rank builds over its own shards")
        if opt is not None and not callable(getattr(opt, "build", None)):
            raise TypeError(f"optimizer must be an optimizer spec with build(params) (raytp.AdamW, "
                            f"raytp.SGD) or None for inference, got {type(opt).__name__}")

    @property
    def generation(self) -> GenerationOptions:
        """The generation options (:class:`raytp.inference.GenerationOptions`)."""
        return GenerationOptions(self.max_batch, self.max_len, self.cuda_graphs)

    @property
    def trains(self) -> bool:
        """Whether the rank gets an optimizer (False: inference-only)."""
        return self.optimizer is not None

    def check_tp(self, tp: int) -> None:
        """Refuse, before any rank work, sizes of a raytp config that ``tp`` does not divide."""
        if hasattr(self.model, "check_tp"):
            self.model.check_tp(tp)

    def check(self, tp: int) -> None:
        """Everything the driver can refuse before any rank work: :meth:`check_tp`, and on a
        plain module made on the meta device, :meth:`check_plan` and :meth:`check_names`."""
        self.check_tp(tp)
        module = self._meta_module()
        if module is not None:
            self.check_plan(module, tp)
        self.check_names()

    def _meta_module(self) -> nn.Module | None:
        """The factory's module on the meta device (no memory,
        :func:`raytp.engine.names.module_for_names`); None for a raytp config, or a factory
        that cannot run there (e.g. it reads weights): the ranks check those."""
        from raytp.engine.names import module_for_names

        if hasattr(self.model, "build"):
            return None
        module = module_for_names(self.model)
        return module if isinstance(module, nn.Module) else None

    def check_plan(self, module: nn.Module, tp: int) -> None:
        """Refuse, before any rank work, a plan with an unknown style, a pattern that matches
        nothing, a module of the wrong type, or a colwise output that reaches a replicated
        layer (:func:`raytp.parallelize.check_plan_flow`). ``plan=None`` is logged: the
        model is replicated on every rank."""
        from raytp.parallelize import check_plan, check_plan_flow

        if self.plan is None:
            (log.warning if tp > 1 else log.info)(
                "plan=None: %s is replicated whole on every rank (no tensor parallelism); pass "
                "plan={pattern: 'colwise' | 'rowwise' | ...} to shard it", type(module).__name__)
            return
        check_plan_flow(module, check_plan(module, dict(self.plan)))

    def check_names(self) -> None:
        """Refuse, before any rank work, module-name patterns (``activation_checkpointing``,
        ``compile``) that match no submodule: matched against a module with the ranks'
        names made on the driver (:func:`raytp.engine.names.module_for_names`: a plain
        factory's on the meta device, a raytp config's in miniature). Where none can be
        made, the ranks check when they build."""
        from raytp.engine.names import module_for_names

        ckpt = self.activation_checkpointing if isinstance(self.activation_checkpointing, Mapping) else None
        options = compile_options(self.compile)
        parts = options.parts if options is not None else None
        if not (ckpt or parts):
            return
        module = module_for_names(self.model)
        if module is None:
            return
        if ckpt:
            choose(module, ckpt)
        if parts:
            select_parts(module, parts)

    def make_module(self, device: torch.device, mesh) -> nn.Module:
        """The model shard on ``device``: the config's build, or the factory's module
        parallelized by ``plan`` (torch seeded with ``seed`` first)."""
        from raytp.parallelize import parallelize

        torch.manual_seed(self.seed)  # the same on every rank: each then keeps its slice
        if hasattr(self.model, "build"):
            return self.model.build(mesh, device=device)
        module = self.model()
        if not isinstance(module, nn.Module):
            raise TypeError(f"the model factory returned {type(module).__name__}, not an nn.Module")
        module = module.to(device)
        return parallelize(module, mesh, self.plan) if self.plan is not None else module
