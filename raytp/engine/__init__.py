"""A rank's assembly and phases, without Ray.

:class:`BuildSpec` says what a rank is built from; :func:`build_engine` builds it on a
:class:`~raytp.DeviceMesh`; :class:`RankEngine` runs its phases. A rank actor and a
``torchrun`` script build exactly the same rank::

    engine = build_engine(mesh, BuildSpec(model=GPTConfig(...), optimizer=raytp.AdamW()))
    metrics = engine.train_step(batch)
"""

from raytp.engine.batches import batch_items, default_loss, to_device
from raytp.engine.build import build_engine, describe
from raytp.engine.rank import InferenceOnly, NonFiniteLoss, RankEngine
from raytp.engine.spec import ON_NAN, BuildSpec

__all__ = ["ON_NAN", "BuildSpec", "InferenceOnly", "NonFiniteLoss", "RankEngine", "batch_items",
           "build_engine", "default_loss", "describe", "to_device"]
