"""ParallelMLP and VocabParallelEmbedding against the same math on one process."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import raytp
from raytp.comm import count_collectives
from raytp.nn import ParallelMLP, VocabParallelEmbedding

import _dist
from helpers import F64, assert_params_match, mesh, world

WORLDS = [1, 2, 4]


class RefMLP(nn.Module):
    """The one-device MLP, with ParallelMLP's parameter names."""

    def __init__(self, hidden, ffn, activation, bias):
        super().__init__()
        self.activation = activation
        fused = activation == "swiglu"
        self.fc_in = nn.Linear(hidden, 2 * ffn if fused else ffn, bias=bias, dtype=torch.float64)
        self.fc_out = nn.Linear(ffn, hidden, bias=bias, dtype=torch.float64)

    def forward(self, x):
        h = self.fc_in(x)
        if self.activation == "swiglu":
            gate, up = h.chunk(2, -1)
            return self.fc_out(F.silu(gate) * up)
        return self.fc_out(F.gelu(h))


def _rand(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _check_mlp(activation, bias):
    rank, n = world()
    m = mesh(n)
    hidden, ffn = 6, 4 * n
    counts = None
    for spec in (raytp.SGD(lr=0.1), raytp.AdamW(lr=0.01)):
        torch.manual_seed(0)
        ref = RefMLP(hidden, ffn, activation, bias)
        torch.manual_seed(0)  # same seed: the TP layers hold exactly ref's shards
        mlp = ParallelMLP(hidden, ffn, mesh=m, activation=activation, bias=bias,
                          dtype=torch.float64)
        assert_params_match(mlp, ref, m.tp_rank, rtol=0, atol=0)
        x = _rand(2, 5, hidden, seed=1)
        x_ref, x_tp = x.clone().requires_grad_(), x.clone().requires_grad_()
        grad_out = _rand(2, 5, hidden, seed=2)
        with count_collectives() as fwd:
            y = mlp(x_tp)
        torch.testing.assert_close(y, ref(x_ref), **F64)
        with count_collectives() as bwd:
            (y * grad_out).sum().backward()
        (ref(x_ref) * grad_out).sum().backward()
        torch.testing.assert_close(x_tp.grad, x_ref.grad, **F64)
        raytp.sync_grads(mlp, m)
        assert_params_match(mlp, ref, m.tp_rank, grads=True)
        spec.build(mlp.parameters()).step()
        spec.build(ref.parameters()).step()
        assert_params_match(mlp, ref, m.tp_rank)
        counts = (fwd.by_kind(), bwd.by_kind())
    return counts


@pytest.mark.parametrize("n", WORLDS)
@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
@pytest.mark.parametrize("bias", [True, False])
def test_parallel_mlp_matches_one_device(n, activation, bias):
    fwd, bwd = _dist.run(n, _check_mlp, activation, bias)[0]
    # pinned: column -> row issues exactly one all-reduce forward and one backward
    assert (fwd, bwd) == (({"all_reduce": 1}, {"all_reduce": 1}) if n > 1 else ({}, {}))


def _check_embedding(num_embeddings, padding_idx):
    rank, n = world()
    m = mesh(n)
    torch.manual_seed(3)
    ref = nn.Embedding(num_embeddings, 5, padding_idx=padding_idx, dtype=torch.float64)
    emb = VocabParallelEmbedding.from_embedding(ref, m)
    assert emb.weight.shape[0] == -(-num_embeddings // n)
    assert_params_match(emb, ref, m.tp_rank)
    torch.manual_seed(3)  # same seed, built directly
    built = VocabParallelEmbedding(num_embeddings, 5, mesh=m, padding_idx=padding_idx,
                                   dtype=torch.float64)
    assert_params_match(built, ref, m.tp_rank, rtol=0, atol=0)
    ids = torch.randint(0, num_embeddings, (3, 7), generator=torch.Generator().manual_seed(4))
    ids[0, :2] = num_embeddings - 1  # the last real row, next to the padding
    if padding_idx is not None:
        ids[1, :3] = padding_idx
    grad_out = _rand(3, 7, 5, seed=5)
    with count_collectives() as c:
        y = emb(ids)
    torch.testing.assert_close(y, ref(ids), **F64)
    (y * grad_out).sum().backward()
    (ref(ids) * grad_out).sum().backward()
    raytp.sync_grads(emb, m)
    assert_params_match(emb, ref, m.tp_rank, grads=True)
    opt, opt_ref = raytp.AdamW(lr=0.1).build(emb.parameters()), raytp.AdamW(lr=0.1).build(
        ref.parameters())
    opt.step()
    opt_ref.step()
    assert_params_match(emb, ref, m.tp_rank)
    return c.by_kind()


@pytest.mark.parametrize("n", WORLDS)
@pytest.mark.parametrize("num_embeddings,padding_idx", [(16, None), (13, None), (13, 2)])
def test_vocab_parallel_embedding(n, num_embeddings, padding_idx):
    counts = _dist.run(n, _check_embedding, num_embeddings, padding_idx)[0]
    assert counts == ({"all_reduce": 1} if n > 1 else {})


def test_unknown_activation():
    with pytest.raises(ValueError, match="activation='relu6' is not one of"):
        ParallelMLP(4, 8, mesh=None, activation="relu6")
