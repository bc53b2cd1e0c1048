"""raytp: tensor-parallel training and inference of PyTorch models on Ray.

The core (this package without :mod:`raytp.driver`) is pure PyTorch and runs the
same under Ray actors, ``torchrun`` or test processes.
"""

from raytp import checkpoint, comm, models, nn, schedules
from raytp.dtensor import DTensor
from raytp.inference import SamplingParams
from raytp.mesh import DeviceMesh, init_distributed
from raytp.optim import SGD, AdamW, clip_grad_norm_, grad_norm, sync_grads
from raytp.parallelize import parallelize
from raytp.placement import Partial, Replicate, Shard
from raytp.precision import MixedPrecision

__version__ = "0.1.0"

_DRIVER = {"TPCluster", "RankError", "RankDied", "RankHung", "PhaseTimeout", "ClusterResourceError",
           "ClusterFailed"}


def __getattr__(name):
    # The driver needs Ray; import it only when asked, so that the core stays Ray-free.
    if name in _DRIVER:
        import raytp.driver

        return getattr(raytp.driver, name)
    raise AttributeError(f"module 'raytp' has no attribute {name!r}")

__all__ = [
    "SGD",
    "AdamW",
    "ClusterResourceError",
    "PhaseTimeout",
    "RankError",
    "TPCluster",
    "DTensor",
    "DeviceMesh",
    "MixedPrecision",
    "Partial",
    "Replicate",
    "SamplingParams",
    "Shard",
    "checkpoint",
    "clip_grad_norm_",
    "comm",
    "models",
    "grad_norm",
    "init_distributed",
    "nn",
    "parallelize",
    "schedules",
    "sync_grads",
]
