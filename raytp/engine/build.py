"""``build_engine``: a rank's whole assembly from a :class:`~raytp.engine.BuildSpec`,
the same under a Ray rank actor, ``torchrun`` or a test process."""

from __future__ import annotations

import logging
from typing import Any

from raytp import tracing
from raytp.activation_ckpt import apply_activation_checkpointing
from raytp.engine.rank import RankEngine
from raytp.engine.spec import BuildSpec
from raytp.mesh import DeviceMesh
from raytp.metrics import count_params
from raytp.nn.tuning import apply_overlap
from raytp.validate import batch_checker

log = logging.getLogger(__name__)


def build_engine(mesh: DeviceMesh, spec: BuildSpec) -> RankEngine:
    """The rank of ``mesh`` built as ``spec`` says: the seeded model shard, the
    overlap setting (collective for ``"symm_mem"``), activation checkpointing, the
    layer tags that name the collectives, and the optimizer over the local shards
    (none for inference; DP-sharded with ``shard_over_dp``). Every rank of the mesh
    calls it."""
    if not isinstance(spec, BuildSpec):
        raise TypeError(f"build_engine takes a raytp.engine.BuildSpec, got {type(spec).__name__}")
    spec.check_tp(mesh.tp_size)
    module = spec.make_module(mesh.device, mesh)
    if spec.overlap is not None:
        apply_overlap(module, spec.overlap)
    apply_activation_checkpointing(module, spec.activation_checkpointing)
    tracing.tag_submodules(module)  # collectives carry the name of the layer issuing them
    optimizer = _build_optimizer(spec.optimizer, module, mesh) if spec.trains else None
    return RankEngine(mesh, module, optimizer, spec.loss_fn, max_grad_norm=spec.max_grad_norm,
                      on_nan=spec.on_nan)


def _build_optimizer(optimizer, module, mesh):
    """The optimizer over the local shards; a DP-sharded one (``shard_over_dp``) also gets the mesh."""
    if getattr(optimizer, "shard_over_dp", False):
        return optimizer.build(module.parameters(), mesh=mesh)
    return optimizer.build(module.parameters())


def describe(engine: RankEngine, spec: BuildSpec) -> dict[str, Any]:
    """What the driver learns from a build: the model's size, this rank's bytes, and
    what checks its batches on the driver (:func:`raytp.validate.batch_checker`)."""
    module = engine.model
    return {"params": count_params(module), **engine.memory_bytes(),
            "batch_checker": batch_checker(module, spec.loss_fn)}
