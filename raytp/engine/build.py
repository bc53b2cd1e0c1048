"""``build_engine``: a rank's whole assembly from a :class:`~raytp.engine.BuildSpec`,
the same under a Ray rank actor, ``torchrun`` or a test process."""

from __future__ import annotations

import logging
from typing import Any

from raytp import tracing
from raytp.activation_ckpt import apply_activation_checkpointing
from raytp.compile import compile_blocks
from raytp.engine.rank import RankEngine
from raytp.engine.spec import BuildSpec
from raytp.inference.generator import generative
from raytp.mesh import DeviceMesh
from raytp.metrics import count_params
from raytp.nn.kernels import apply_overlap
from raytp.optim import build_optimizer
from raytp.precision import apply_precision
from raytp.validate import batch_checker
from raytp.zero_mixed import build_sharded_mixed

log = logging.getLogger(__name__)


def build_engine(mesh: DeviceMesh, spec: BuildSpec) -> RankEngine:
    """The rank of ``mesh`` built as ``spec`` says: the seeded model shard, the
    overlap setting (collective for ``"symm_mem"``), the compiled blocks, activation
    checkpointing, the layer tags that name the collectives, the precision policy
    (master weights), and the optimizer over the local shards or their masters (none
    for inference; DP-sharded with ``shard_over_dp``); for inference, a generative
    model's KV cache (:mod:`raytp.inference`). Every rank of the mesh calls it."""
    if not isinstance(spec, BuildSpec):
        raise TypeError(f"build_engine takes a raytp.engine.BuildSpec, got {type(spec).__name__}")
    spec.check_tp(mesh.tp_size)
    module = spec.make_module(mesh.device, mesh)
    if spec.overlap is not None:
        apply_overlap(module, spec.overlap)
    compile_blocks(module, spec.compile, mesh)
    apply_activation_checkpointing(module, spec.activation_checkpointing)
    tracing.tag_submodules(module)  # collectives carry the name of the layer issuing them
    if spec.trains and spec.precision is not None and getattr(spec.optimizer, "shard_over_dp", False) \
            and mesh.dp_size > 1:  # masters sharded with the optimizer state, made before the cast
        optimizer, masters = build_sharded_mixed(spec.optimizer, module, spec.precision, mesh)
    else:
        masters = apply_precision(module, spec.precision, spec.trains)  # None without a policy
        optimizer = build_optimizer(spec.optimizer, module, masters, mesh) if spec.trains else None
    engine = RankEngine(mesh, module, optimizer, spec.loss_fn, max_grad_norm=spec.max_grad_norm,
                        on_nan=spec.on_nan, lr_schedule=spec.lr_schedule, masters=masters,
                        micro_batches=spec.micro_batches, generation=spec.generation)
    if not spec.trains and generative(module):
        engine.generation.prepare()  # an inference rank's KV cache is made now, from what is free
    return engine


def describe(engine: RankEngine, spec: BuildSpec) -> dict[str, Any]:
    """What the driver learns from a build: the model's size, this rank's bytes, what
    checks its batches on the driver (:func:`raytp.validate.batch_checker`), and what
    it checks prompts against (:meth:`raytp.inference.Generator.describe`)."""
    module = engine.model
    return {"params": count_params(module), **engine.memory_bytes(),
            "batch_checker": batch_checker(module, spec.loss_fn), "generation": engine.generation.describe()}
