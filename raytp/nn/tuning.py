"""The overlap settings moved to :mod:`raytp.nn.kernels`; this module keeps their old
import path (``actors/rank.py``, ``raytp/driver/cluster.py``)."""

from raytp.nn.kernels import FALLBACK_CHUNKS, OVERLAP, apply_overlap, set_overlap, use_symm_mem

__all__ = ["FALLBACK_CHUNKS", "OVERLAP", "apply_overlap", "set_overlap", "use_symm_mem"]
