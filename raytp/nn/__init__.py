"""Tensor-parallel layers. Each computes on local shards and calls its collectives
explicitly in ``forward`` through :mod:`raytp.comm`."""

from raytp.nn.attention import ParallelAttention, QKVParallelLinear, check_heads
from raytp.nn.cross_entropy import vocab_parallel_cross_entropy
from raytp.nn.embedding import PositionEmbedding, VocabParallelEmbedding, padded_vocab
from raytp.nn.kernels import set_overlap, use_symm_mem
from raytp.nn.kv_cache import KVCache
from raytp.nn.linear import ColumnParallelLinear, RowParallelLinear
from raytp.nn.lm_head import ParallelLMHead
from raytp.nn.mlp import ParallelMLP
from raytp.nn.norm import LayerNorm, RMSNorm
from raytp.nn.rotary import apply_rope, rope_tables

__all__ = [
    "ColumnParallelLinear",
    "KVCache",
    "LayerNorm",
    "ParallelAttention",
    "ParallelLMHead",
    "ParallelMLP",
    "PositionEmbedding",
    "QKVParallelLinear",
    "RMSNorm",
    "RowParallelLinear",
    "VocabParallelEmbedding",
    "apply_rope",
    "check_heads",
    "padded_vocab",
    "rope_tables",
    "set_overlap",
    "use_symm_mem",
    "vocab_parallel_cross_entropy",
]
