"""The language-model head: logits split over the (padded) vocabulary, never gathered."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from raytp.comm import ops
from raytp.mesh import DeviceMesh
from raytp.nn.embedding import VocabParallelEmbedding, load_vocab_rows_, vocab_param
from raytp.nn.linear import SEQ_DIM


class ParallelLMHead(nn.Module):
    """``logits = x W^T`` with W's rows, the vocabulary padded to a multiple of tp,
    split over the TP group as in :class:`VocabParallelEmbedding`.

    Input (B, T, dim), replicated; or (B, T / tp, dim), split along the sequence, with
    ``sequence_parallel``. Weight (V_padded / tp, dim) per rank. Output (B, T,
    V_padded / tp): this rank's columns of the logits, the padded ones included (their
    weights are zero rows; :func:`vocab_parallel_cross_entropy` leaves them out).
    ``tied_to`` shares the embedding's Parameter, whose local rows are exactly this
    head's local rows, and leaves its initialization to the embedding; no bias. An untied
    head is initialized normal(0, ``init_std``), or as ``nn.Linear`` for None.
    Collectives: forward none (an all-gather of the input under sequence parallelism);
    backward one all-reduce of the input gradient (a reduce-scatter under sequence
    parallelism).
    """

    def __init__(self, embedding_dim: int, vocab_size: int, *, mesh: DeviceMesh,
                 tied_to: VocabParallelEmbedding | None = None, sequence_parallel: bool = False,
                 device=None, dtype=None, init_std: float | None = None):
        super().__init__()
        self.embedding_dim, self.vocab_size, self.init_std = embedding_dim, vocab_size, init_std
        self.mesh, self.sequence_parallel = mesh, sequence_parallel
        self.tied = tied_to is not None
        if self.tied:
            if (tied_to.num_embeddings, tied_to.embedding_dim) != (vocab_size, embedding_dim):
                raise ValueError(f"tied_to has {tied_to.num_embeddings} x {tied_to.embedding_dim} "
                                 f"rows; the head needs {vocab_size} x {embedding_dim}")
            self.weight = tied_to.weight
        else:
            self.weight = vocab_param(vocab_size, embedding_dim, mesh, device, dtype)
        self.rows_per_rank = self.weight.shape[0]
        self.vocab_start = mesh.tp_rank * self.rows_per_rank
        if not self.tied and self.weight.device.type != "meta":
            self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """normal(0, init_std), or ``nn.Linear(embedding_dim, vocab_size, bias=False)``'s
        initialization for None, of the full weight, then this rank's rows (the padded rows
        zero). A tied head leaves the embedding's weight alone."""
        if self.tied:
            return
        full = torch.empty(self.vocab_size, self.embedding_dim, device=self.weight.device,
                           dtype=self.weight.dtype)
        if self.init_std is None:
            nn.init.kaiming_uniform_(full, a=math.sqrt(5))
        else:
            nn.init.normal_(full, 0.0, self.init_std)
        self.load_full_(full)

    @torch.no_grad()
    def load_full_(self, weight: torch.Tensor):
        """Set the head from the full (vocab_size, embedding_dim) weight."""
        load_vocab_rows_(self.weight, weight, self.vocab_size, self.mesh.tp_rank)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tp = self.mesh.tp_comm
        x = ops.all_gather_seq(x, tp, SEQ_DIM) if self.sequence_parallel else ops.copy_to(x, tp)
        return F.linear(x, self.weight)  # (B, T, V_padded / tp)

    def extra_repr(self):
        return (f"{self.embedding_dim}, {self.vocab_size}, tp={self.mesh.tp_size}, tied={self.tied}"
                + (", sequence_parallel=True" if self.sequence_parallel else ""))
