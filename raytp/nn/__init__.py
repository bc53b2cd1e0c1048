"""Tensor-parallel layers. Each computes on local shards and calls its collectives
explicitly in ``forward`` through :mod:`raytp.comm`."""

from raytp.nn.embedding import VocabParallelEmbedding
from raytp.nn.linear import ColumnParallelLinear, RowParallelLinear
from raytp.nn.mlp import ParallelMLP

__all__ = ["ColumnParallelLinear", "ParallelMLP", "RowParallelLinear", "VocabParallelEmbedding"]
