"""Vocabulary-parallel embedding: the rows of the table split over the TP group."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from raytp.comm import ops
from raytp.mesh import DeviceMesh
from raytp.params import ParamSpec, get_spec, materialize_, set_spec
from raytp.placement import Shard


def padded_vocab(num_embeddings: int, tp_size: int) -> int:
    """The vocabulary size rounded up to a multiple of ``tp_size``."""
    return -(-num_embeddings // tp_size) * tp_size


class VocabParallelEmbedding(nn.Module):
    """``nn.Embedding`` with rows [tp_rank * V_r, (tp_rank + 1) * V_r) on each rank.

    The vocabulary is padded with zero rows to a multiple of tp (``V_r`` rows per
    rank). Ids (...,) outside this rank's rows give zeros; the all-reduce of the
    (..., embedding_dim) partial results makes the output replicated.
    Collectives: forward one all-reduce; backward none.
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, *, mesh: DeviceMesh,
                 padding_idx: int | None = None, device=None, dtype=None):
        super().__init__()
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.padding_idx = padding_idx
        self.mesh = mesh
        vocab = padded_vocab(num_embeddings, mesh.tp_size)
        self.rows_per_rank = vocab // mesh.tp_size
        self.vocab_start = mesh.tp_rank * self.rows_per_rank
        spec = ParamSpec(Shard(0), torch.Size((vocab, embedding_dim)), mesh.tp_size)
        weight = torch.empty(self.rows_per_rank, embedding_dim, device=device, dtype=dtype)
        self.weight = set_spec(nn.Parameter(weight), spec)
        if self.weight.device.type != "meta":
            self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """``nn.Embedding``'s N(0, 1) initialization of the full table, then this rank's rows."""
        full = torch.empty(self.num_embeddings, self.embedding_dim, device=self.weight.device,
                           dtype=self.weight.dtype)
        nn.init.normal_(full)
        if self.padding_idx is not None:
            full[self.padding_idx].zero_()
        self.load_full_(full)

    @torch.no_grad()
    def load_full_(self, weight: torch.Tensor):
        """Set the table from the full (num_embeddings, embedding_dim) weight."""
        if tuple(weight.shape) != (self.num_embeddings, self.embedding_dim):
            raise ValueError(f"full shape {tuple(weight.shape)} != "
                             f"{(self.num_embeddings, self.embedding_dim)}")
        pad = get_spec(self.weight).global_shape[0] - self.num_embeddings
        padded = F.pad(weight.to(self.weight.device), (0, 0, 0, pad))
        self.weight.copy_(get_spec(self.weight).shard(padded, self.mesh.tp_rank))
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
        return ops.reduce_from(out, self.mesh.tp_comm)

    def _local_padding_idx(self) -> int | None:
        if self.padding_idx is None:
            return None
        local = self.padding_idx - self.vocab_start
        return local if 0 <= local < self.rows_per_rank else None

    def extra_repr(self):
        return (f"{self.num_embeddings}, {self.embedding_dim}, tp={self.mesh.tp_size}, "
                f"rows_per_rank={self.rows_per_rank}")
