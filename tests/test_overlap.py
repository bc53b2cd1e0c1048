"""The overlapped paths (raytp.nn.overlap) compute exactly what the plain paths do:
parity with nn.Linear on one process (forward, gradients, one AdamW step), and the
collectives they issue, at tp 1, 2 and 4."""

import pytest
import torch
from torch import nn

from raytp.nn import ColumnParallelLinear, ParallelMLP, RowParallelLinear, set_overlap

import _dist
from helpers import check_parity, chunk, mesh, randn, world

WORLDS = [1, 2, 4]


def _check_linear(kind, sp, bias, chunks):
    rank, n = world()
    m = mesh(n)
    torch.manual_seed(0)
    if kind == "column":
        ref = nn.Linear(6, 4 * n, bias=bias, dtype=torch.float64)
        layer = ColumnParallelLinear.from_linear(ref, m, sequence_parallel=sp)
        local_in = (lambda x: chunk(x, 1)) if sp else (lambda x: x)
        local_out = lambda y: chunk(y, -1)  # noqa: E731
    else:
        ref = nn.Linear(4 * n, 6, bias=bias, dtype=torch.float64)
        layer = RowParallelLinear.from_linear(ref, m, sequence_parallel=sp)
        local_in = lambda x: chunk(x, -1)  # noqa: E731
        local_out = (lambda y: chunk(y, 1)) if sp else (lambda y: y)
    set_overlap(layer, True, chunks)
    x = randn(3, 4 * n, ref.in_features, seed=1)  # (B, T, H) with T divisible by tp * chunks
    return check_parity(layer, ref, x, local_in=local_in, local_out=local_out)


@pytest.mark.parametrize("n", WORLDS)
@pytest.mark.parametrize("kind", ["column", "row"])
@pytest.mark.parametrize("sp,chunks", [(False, 1), (True, 1), (True, 2), (True, 4)],
                         ids=["tp", "sp-1chunk", "sp-2chunks", "sp-4chunks"])
def test_overlapped_linear_matches_one_device(n, kind, sp, chunks):
    fwd, bwd = _dist.run(n, _check_linear, kind, sp, True, chunks)[0]
    if n == 1:
        assert (fwd, bwd) == ({}, {})
    elif not sp:  # the same collectives as the plain path, launched asynchronously
        assert (fwd, bwd) == (({}, {"all_reduce": 1}) if kind == "column" else ({"all_reduce": 1}, {}))
    elif kind == "column":  # one all-gather / reduce-scatter per chunk
        assert (fwd, bwd) == ({"all_gather": chunks}, {"reduce_scatter": chunks})
    else:
        assert (fwd, bwd) == ({"reduce_scatter": chunks}, {"all_gather": chunks})


def _check_mlp_on_off(sp):
    """The same MLP with overlap on and off: equal outputs and gradients."""
    rank, n = world()
    m = mesh(n)
    outs = []
    for enabled in (False, True):
        torch.manual_seed(0)
        mlp = set_overlap(ParallelMLP(8, 4 * n, mesh=m, activation="swiglu", sequence_parallel=sp,
                                      dtype=torch.float64), enabled)
        x = randn(2, 4 * n, 8, seed=3)
        x = (chunk(x, 1) if sp else x).clone().requires_grad_()
        y = mlp(x)
        y.pow(2).sum().backward()
        outs.append([y.detach(), x.grad] + [p.grad for p in mlp.parameters()])
    for a, b in zip(*outs, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("sp", [False, True], ids=["tp", "sp"])
def test_mlp_overlap_on_and_off_agree(sp):
    _dist.run(2, _check_mlp_on_off, sp)


def _check_default():
    layer = ColumnParallelLinear(4, 4, mesh=mesh(1))
    assert layer.overlap is False


def test_overlap_defaults_off_on_cpu():
    _dist.run(1, _check_default)
