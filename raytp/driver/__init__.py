"""The driver side of raytp: ``TPCluster`` and the Ray plumbing behind it."""

from raytp.driver.cluster import Pending, TPCluster
from raytp.driver.errors import ClusterResourceError, PhaseTimeout, RankError

__all__ = ["ClusterResourceError", "Pending", "PhaseTimeout", "RankError", "TPCluster"]
