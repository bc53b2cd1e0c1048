"""The vocabulary-parallel embedding under sequence parallelism, the LM head (tied to
the embedding or not, sequence parallel or not) and the learned position embedding,
against the same math on one process (float64) at tp 1, 2 and 4."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from raytp.nn import ParallelLMHead, PositionEmbedding, VocabParallelEmbedding, padded_vocab

import _dist
from helpers import check_parity, chunk, mesh, randn, world

WORLDS = [1, 2, 4]
B, T, D = 2, 8, 6


def _vocab_columns(vocab):
    """Full (..., vocab) logits -> this rank's columns of the padded vocabulary."""
    n = world()[1]
    return lambda y: chunk(F.pad(y, (0, padded_vocab(vocab, n) - vocab)), -1)


def _ids(vocab, seed=4):
    ids = torch.randint(0, vocab, (B, T), generator=torch.Generator().manual_seed(seed))
    ids[0, :2] = vocab - 1  # the last real row, next to the padding
    return ids


def _check_embedding_sp(vocab):
    rank, n = world()
    torch.manual_seed(3)
    ref = nn.Embedding(vocab, D, dtype=torch.float64)
    torch.manual_seed(3)
    emb = VocabParallelEmbedding(vocab, D, mesh=mesh(n), sequence_parallel=True, dtype=torch.float64)
    return check_parity(emb, ref, _ids(vocab), local_in=lambda ids: ids, local_out=lambda y: chunk(y, 1))


@pytest.mark.parametrize("n", WORLDS)
@pytest.mark.parametrize("vocab", [16, 13])
def test_embedding_sequence_parallel(n, vocab):
    fwd, bwd = _dist.run(n, _check_embedding_sp, vocab)[0]
    assert (fwd, bwd) == (({"reduce_scatter": 1}, {"all_gather": 1}) if n > 1 else ({}, {}))


def _check_lm_head(vocab, sp):
    rank, n = world()
    torch.manual_seed(0)
    ref = nn.Linear(D, vocab, bias=False, dtype=torch.float64)
    torch.manual_seed(0)  # same seed: the head holds exactly ref's rows, padded with zeros
    head = ParallelLMHead(D, vocab, mesh=mesh(n), sequence_parallel=sp, dtype=torch.float64)
    local_in = (lambda t: chunk(t, 1)) if sp else (lambda t: t)
    return check_parity(head, ref, randn(B, T, D, seed=1), local_in=local_in,
                        local_out=_vocab_columns(vocab))


@pytest.mark.parametrize("n", WORLDS)
@pytest.mark.parametrize("vocab", [16, 13])
@pytest.mark.parametrize("sp", [False, True], ids=["replicated", "sp"])
def test_lm_head(n, vocab, sp):
    fwd, bwd = _dist.run(n, _check_lm_head, vocab, sp)[0]
    if n > 1:
        assert (fwd, bwd) == (({"all_gather": 1}, {"reduce_scatter": 1}) if sp else ({}, {"all_reduce": 1}))


class Tied(nn.Module):
    """Embed, a nonlinearity, then the head sharing the embedding's weight."""

    def __init__(self, vocab, m=None, sp=False):
        super().__init__()
        if m is None:
            self.embed = nn.Embedding(vocab, D, dtype=torch.float64)
            self.head = lambda h: F.linear(h, self.embed.weight)
        else:
            self.embed = VocabParallelEmbedding(vocab, D, mesh=m, sequence_parallel=sp, dtype=torch.float64)
            self.head = ParallelLMHead(D, vocab, mesh=m, tied_to=self.embed, sequence_parallel=sp)

    def forward(self, ids):
        return self.head(torch.tanh(self.embed(ids)))


def _check_tied(vocab, sp):
    rank, n = world()
    torch.manual_seed(3)
    ref = Tied(vocab)
    torch.manual_seed(3)
    model = Tied(vocab, mesh(n), sp)
    assert model.head.weight is model.embed.weight
    assert [name for name, _ in model.named_parameters()] == ["embed.weight"]
    check_parity(model, ref, _ids(vocab), local_in=lambda ids: ids, local_out=_vocab_columns(vocab))


@pytest.mark.parametrize("n", WORLDS)
@pytest.mark.parametrize("sp", [False, True], ids=["replicated", "sp"])
def test_tied_lm_head(n, sp):
    _dist.run(n, _check_tied, 13, sp)


class RefPositions(nn.Module):
    def __init__(self):
        super().__init__()
        self.table = nn.Embedding(T + 3, D, dtype=torch.float64)
        with torch.no_grad():
            self.table.weight.copy_(randn(T + 3, D, seed=5))

    def forward(self, x):
        return x * self.table.weight[2:2 + T]  # positions [2, 2 + T)


class Positions(nn.Module):
    def __init__(self, m, sp):
        super().__init__()
        self.table = PositionEmbedding(T + 3, D, mesh=m, sequence_parallel=sp, dtype=torch.float64)
        with torch.no_grad():
            self.table.weight.copy_(randn(T + 3, D, seed=5))

    def forward(self, x):
        return x * self.table(2, T)


def _check_positions(sp):
    rank, n = world()
    local = (lambda t: chunk(t, 1)) if sp else (lambda t: t)
    check_parity(Positions(mesh(n), sp), RefPositions(), randn(B, T, D, seed=1), local_in=local,
                 local_out=local)
    with pytest.raises(ValueError, match="positions up to 12 exceed max_len=11"):
        Positions(mesh(n), sp).table(4, T)


@pytest.mark.parametrize("n", WORLDS)
@pytest.mark.parametrize("sp", [False, True], ids=["replicated", "sp"])
def test_position_embedding(n, sp):
    _dist.run(n, _check_positions, sp)


def _check_tied_mismatch():
    m = mesh(2)
    emb = VocabParallelEmbedding(10, D, mesh=m)
    with pytest.raises(ValueError, match="tied_to has 10 x 6 rows; the head needs 11 x 6"):
        ParallelLMHead(D, 11, mesh=m, tied_to=emb)


def test_tied_head_must_match_the_embedding():
    _dist.run(2, _check_tied_mismatch)
