"""Vocabulary-parallel embedding (the rows of the table split over the TP group) and
the learned position embedding beside it."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from raytp.comm import ops
from raytp.comm.functional import check_divisible, local_chunk
from raytp.mesh import DeviceMesh
from raytp.nn.linear import SEQ_DIM
from raytp.params import ParamSpec, get_spec, materialize_, set_spec
from raytp.placement import Replicate, Shard


def padded_vocab(num_embeddings: int, tp_size: int) -> int:
    """The vocabulary size rounded up to a multiple of ``tp_size``."""
    return -(-num_embeddings // tp_size) * tp_size


def vocab_param(num_embeddings: int, embedding_dim: int, mesh: DeviceMesh, device, dtype) -> nn.Parameter:
    """This rank's rows of a (padded vocabulary, embedding_dim) table, sharded on dim 0."""
    vocab = padded_vocab(num_embeddings, mesh.tp_size)
    spec = ParamSpec(Shard(0), torch.Size((vocab, embedding_dim)), mesh.tp_size)
    weight = torch.empty(vocab // mesh.tp_size, embedding_dim, device=device, dtype=dtype)
    return set_spec(nn.Parameter(weight), spec)


@torch.no_grad()
def load_vocab_rows_(param: torch.Tensor, full: torch.Tensor, num_embeddings: int, tp_rank: int) -> None:
    """Set ``param`` to this rank's rows of the full (num_embeddings, dim) ``full``,
    padded with zero rows to the padded vocabulary."""
    spec = get_spec(param)
    if tuple(full.shape) != (num_embeddings, spec.global_shape[1]):
        raise ValueError(f"full shape {tuple(full.shape)} != {(num_embeddings, spec.global_shape[1])}")
    padded = F.pad(full.to(param.device), (0, 0, 0, spec.global_shape[0] - num_embeddings))
    param.copy_(spec.shard(padded, tp_rank))


class VocabParallelEmbedding(nn.Module):
    """``nn.Embedding`` with rows [tp_rank * V_r, (tp_rank + 1) * V_r) on each rank.

    The vocabulary is padded with zero rows to a multiple of tp (``V_r`` rows per
    rank). Ids (...,) outside this rank's rows give zeros; the all-reduce of the
    (..., embedding_dim) partial results makes the output replicated. With
    ``sequence_parallel`` the ids are (B, T) and a reduce-scatter along T leaves the
    output (B, T / tp, embedding_dim), split along the sequence.
    Collectives: forward one all-reduce (a reduce-scatter under sequence parallelism);
    backward none (an all-gather of the gradient under sequence parallelism).
    The full table is initialized normal(0, ``init_std``) (``nn.Embedding``'s for 1.0).
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, *, mesh: DeviceMesh,
                 padding_idx: int | None = None, sequence_parallel: bool = False, device=None,
                 dtype=None, init_std: float = 1.0):
        super().__init__()
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.padding_idx = padding_idx
        self.sequence_parallel = sequence_parallel
        self.mesh, self.init_std = mesh, init_std
        self.weight = vocab_param(num_embeddings, embedding_dim, mesh, device, dtype)
        self.rows_per_rank = self.weight.shape[0]
        self.vocab_start = mesh.tp_rank * self.rows_per_rank
        if self.weight.device.type != "meta":
            self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """normal(0, init_std) for the full table (the padding row zero), then this rank's
        rows; the padded rows past the vocabulary are zero."""
        full = torch.empty(self.num_embeddings, self.embedding_dim, device=self.weight.device,
                           dtype=self.weight.dtype)
        nn.init.normal_(full, 0.0, self.init_std)
        if self.padding_idx is not None:
            full[self.padding_idx].zero_()
        self.load_full_(full)

    @torch.no_grad()
    def load_full_(self, weight: torch.Tensor):
        """Set the table from the full (num_embeddings, embedding_dim) weight."""
        load_vocab_rows_(self.weight, weight, self.num_embeddings, self.mesh.tp_rank)
        return self

    @classmethod
    def from_embedding(cls, embedding: nn.Embedding, mesh: DeviceMesh) -> VocabParallelEmbedding:
        if embedding.max_norm is not None or embedding.scale_grad_by_freq or embedding.sparse:
            raise ValueError("VocabParallelEmbedding supports neither max_norm, "
                             "scale_grad_by_freq nor sparse gradients")
        layer = cls(embedding.num_embeddings, embedding.embedding_dim, mesh=mesh,
                    padding_idx=embedding.padding_idx, device="meta", dtype=embedding.weight.dtype)
        materialize_(layer, embedding.weight.device)
        return layer.load_full_(embedding.weight)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        outside = (ids < self.vocab_start) | (ids >= self.vocab_start + self.rows_per_rank)
        local_ids = (ids - self.vocab_start).masked_fill(outside, 0)
        out = F.embedding(local_ids, self.weight, self._local_padding_idx())  # (..., dim), partial
        out = out.masked_fill(outside.unsqueeze(-1), 0.0)
        tp = self.mesh.tp_comm
        if self.sequence_parallel:
            check_divisible(out.shape[SEQ_DIM], tp.size, "sequence length T (sequence_parallel)")
            return ops.reduce_scatter_seq(out, tp, SEQ_DIM)
        return ops.reduce_from(out, tp)

    def _local_padding_idx(self) -> int | None:
        if self.padding_idx is None:
            return None
        local = self.padding_idx - self.vocab_start
        return local if 0 <= local < self.rows_per_rank else None

    def extra_repr(self):
        return (f"{self.num_embeddings}, {self.embedding_dim}, tp={self.mesh.tp_size}, "
                f"rows_per_rank={self.rows_per_rank}"
                + (", sequence_parallel=True" if self.sequence_parallel else ""))


class PositionEmbedding(nn.Module):
    """Learned absolute positions: a (max_len, dim) table, replicated on every rank.

    ``forward(start, length)`` returns the rows of positions [start, start + length)
    as (1, length, dim) (``at(positions)``: those of (B, T) positions, (B, T, dim)); with
    ``sequence_parallel``, this rank's chunk of them, (1, length / tp, dim), and the
    gradient of the table, a partial sum over the sequence chunks, is summed over the TP
    group by :func:`raytp.sync_grads`.
    Initialized normal(0, ``init_std``). Collectives: none.
    """

    def __init__(self, max_len: int, dim: int, *, mesh: DeviceMesh, sequence_parallel: bool = False,
                 device=None, dtype=None, init_std: float = 1.0):
        super().__init__()
        self.mesh, self.sequence_parallel, self.init_std = mesh, sequence_parallel, init_std
        weight = nn.Parameter(torch.empty(max_len, dim, device=device, dtype=dtype))
        grad_reduce = mesh.tp_comm if sequence_parallel else None
        self.weight = set_spec(weight, ParamSpec(Replicate(), weight.shape, mesh.tp_size,
                                                 grad_reduce=grad_reduce))
        if self.weight.device.type != "meta":
            self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """normal(0, init_std); replicated, so the full table is this rank's."""
        nn.init.normal_(self.weight, 0.0, self.init_std)

    def forward(self, start: int, length: int) -> torch.Tensor:
        if start + length > self.weight.shape[0]:
            raise ValueError(f"positions up to {start + length} exceed max_len={self.weight.shape[0]}")
        rows = self.weight[start:start + length].unsqueeze(0)  # (1, length, dim)
        if self.sequence_parallel:
            rows = local_chunk(rows, self.mesh.tp_comm, SEQ_DIM)  # (1, length / tp, dim)
        return rows

    def at(self, positions: torch.Tensor) -> torch.Tensor:
        """The rows of ``positions`` (B, T), each row its own: (B, T, dim). For decoding,
        which runs without sequence parallelism."""
        return F.embedding(positions, self.weight)
