"""The driver side of raytp: ``TPCluster`` and the Ray plumbing behind it."""

from raytp.driver.cluster import Pending, TPCluster
from raytp.driver.errors import (
    ClusterFailed,
    ClusterResourceError,
    PhaseTimeout,
    RankDied,
    RankError,
    RankHung,
)

__all__ = ["ClusterFailed", "ClusterResourceError", "Pending", "PhaseTimeout", "RankDied", "RankError",
           "RankHung", "TPCluster"]
