"""Sequence parallelism in the linear layers and the MLP, and the replicated norms with
it on and off, against the same math on one process (float64) at tp 1, 2 and 4.

Under sequence parallelism the input and output of a layer pair are (B, T / tp, H):
each rank's chunk of the sequence. Biases and norm weights applied to a chunk get
partial gradients, which sync_grads must sum."""

import pytest
import torch
from test_mlp import RefMLP
from torch import nn

from raytp import Shard
from raytp.nn import ColumnParallelLinear, LayerNorm, ParallelMLP, RMSNorm, RowParallelLinear

import _dist
from helpers import check_parity, chunk, mesh, randn, world

WORLDS = [1, 2, 4]
B, T = 2, 8


def _seq(t):
    return chunk(t, 1)


def _features(t):
    return chunk(t, -1)


def _check_linear(kind, bias):
    rank, n = world()
    m = mesh(n)
    torch.manual_seed(0)
    ref = nn.Linear(8, 12, bias=bias, dtype=torch.float64)
    if kind == "column":  # (B, T/tp, in) -> (B, T, out/tp)
        layer = ColumnParallelLinear.from_linear(ref, m, sequence_parallel=True)
        local_in, local_out = _seq, _features
    else:  # (B, T, in/tp) -> (B, T/tp, out)
        layer = RowParallelLinear.from_linear(ref, m, sequence_parallel=True)
        local_in, local_out = _features, _seq
    return check_parity(layer, ref, randn(B, T, 8, seed=1), local_in=local_in, local_out=local_out)


@pytest.mark.parametrize("n", WORLDS)
@pytest.mark.parametrize("kind", ["column", "row"])
@pytest.mark.parametrize("bias", [True, False])
def test_sequence_parallel_linear(n, kind, bias):
    fwd, bwd = _dist.run(n, _check_linear, kind, bias)[0]
    if n > 1:  # column: all-gather in, reduce-scatter of the gradient; row: the reverse
        assert (fwd, bwd) == (({"all_gather": 1}, {"reduce_scatter": 1}) if kind == "column"
                              else ({"reduce_scatter": 1}, {"all_gather": 1}))


def _check_mlp(activation, sp):
    rank, n = world()
    m = mesh(n)
    torch.manual_seed(0)
    ref = RefMLP(6, 4 * n, activation, True)
    torch.manual_seed(0)
    mlp = ParallelMLP(6, 4 * n, mesh=m, activation=activation, sequence_parallel=sp, dtype=torch.float64)
    local = _seq if sp else (lambda t: t)
    return check_parity(mlp, ref, randn(B, T, 6, seed=1), local_in=local, local_out=local)


@pytest.mark.parametrize("n", WORLDS)
@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
def test_sequence_parallel_mlp(n, activation):
    fwd, bwd = _dist.run(n, _check_mlp, activation, True)[0]
    # pinned: each all-reduce of the MLP becomes one all-gather and one reduce-scatter
    expect = {"all_gather": 1, "reduce_scatter": 1} if n > 1 else {}
    assert fwd == bwd == expect


def _check_norm(kind, sp):
    rank, n = world()
    m = mesh(n)
    if kind == "layernorm":
        ref = nn.LayerNorm(6, eps=1e-5, dtype=torch.float64)
        norm = LayerNorm(6, mesh=m, sequence_parallel=sp, dtype=torch.float64)
    else:
        ref = nn.RMSNorm(6, eps=1e-5, dtype=torch.float64)
        norm = RMSNorm(6, mesh=m, sequence_parallel=sp, dtype=torch.float64)
    with torch.no_grad():  # not the ones/zeros of the initialization, so the test sees them
        for p, q in zip(norm.parameters(), ref.parameters(), strict=True):
            q.copy_(randn(6, seed=7))
            p.copy_(q)
    local = _seq if sp else (lambda t: t)
    return check_parity(norm, ref, randn(B, T, 6, seed=1) * 3 + 1, local_in=local, local_out=local)


@pytest.mark.parametrize("n", WORLDS)
@pytest.mark.parametrize("kind", ["layernorm", "rmsnorm"])
@pytest.mark.parametrize("sp", [False, True], ids=["replicated", "sp"])
def test_norms(n, kind, sp):
    assert _dist.run(n, _check_norm, kind, sp)[0] == ({}, {})  # no collectives either way


def _check_bad_options():
    m = mesh(2)
    with pytest.raises(ValueError, match=r"sequence_parallel=True needs a Replicate\(\) bias"):
        RowParallelLinear(4, 4, mesh=m, sequence_parallel=True, bias_placement=Shard(0))
    with pytest.raises(ValueError, match="cannot be combined with reduce_output=False"):
        RowParallelLinear(4, 4, mesh=m, sequence_parallel=True, reduce_output=False)
    row = RowParallelLinear(4, 4, mesh=m, sequence_parallel=True)
    with pytest.raises(ValueError, match=r"sequence length T \(sequence_parallel\)=5 is not divisible "
                                         r"by tp=2"):
        row(torch.zeros(2, 5, 2))


def test_bad_sequence_parallel_options():
    _dist.run(2, _check_bad_options)
