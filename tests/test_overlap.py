"""The overlapped paths (raytp.nn.overlap) compute exactly what the plain paths do:
parity with nn.Linear on one process (forward, gradients, one AdamW step), and the
collectives they issue, at tp 1, 2 and 4; the symmetric-memory path and its fallback."""

from contextlib import nullcontext

import pytest
import torch
from torch import nn

from raytp.nn import ColumnParallelLinear, ParallelMLP, RowParallelLinear, set_overlap, use_symm_mem

import _dist
from helpers import check_parity, chunk, decomposed_symm_mem, mesh, randn, world

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


def _check_symm_mem_linear(kind, decomposed):
    rank, n = world()
    m = mesh(n)
    torch.manual_seed(0)
    if kind == "column":  # (B, T/tp, in) -> (B, T, out/tp)
        ref = nn.Linear(6, 4 * n, dtype=torch.float64)
        layer = ColumnParallelLinear.from_linear(ref, m, sequence_parallel=True)
        local_in, local_out = (lambda x: chunk(x, 1)), (lambda y: chunk(y, -1))
    else:  # (B, T, in/tp) -> (B, T/tp, out)
        ref = nn.Linear(4 * n, 6, dtype=torch.float64)
        layer = RowParallelLinear.from_linear(ref, m, sequence_parallel=True)
        local_in, local_out = (lambda x: chunk(x, -1)), (lambda y: chunk(y, 1))
    x = randn(3, 4 * n, ref.in_features, seed=1)
    with decomposed_symm_mem(m.tp_comm) if decomposed else nullcontext():
        reason = use_symm_mem(layer)
        counts = check_parity(layer, ref, x, local_in=local_in, local_out=local_out)
    return reason, layer.symm_mem, layer.overlap_chunks, counts


@pytest.mark.parametrize("n", WORLDS)
@pytest.mark.parametrize("kind", ["column", "row"])
def test_symm_mem_path_matches_one_device(n, kind):
    """use_symm_mem where the group can: the layers call the fused ops (here torch's
    decomposed versions of them, on gloo) and equal one device; one collective each way."""
    reason, on, _, (fwd, bwd) = _dist.run(n, _check_symm_mem_linear, kind, True)[0]
    assert reason is None and on
    if n > 1:
        assert (fwd, bwd) == (({"all_gather": 1}, {"reduce_scatter": 1}) if kind == "column"
                              else ({"reduce_scatter": 1}, {"all_gather": 1}))


@pytest.mark.parametrize("kind", ["column", "row"])
def test_symm_mem_falls_back_to_chunks_where_it_cannot_run(kind):
    """On CPU ranks the fused ops cannot run: use_symm_mem says why, on every rank, and
    the layer takes the chunked path (two chunks), with the same math."""
    results = _dist.run(2, _check_symm_mem_linear, kind, False)
    for reason, on, chunks, (fwd, bwd) in results:
        assert reason == "they need CUDA tensors; this group computes on cpu"
        assert not on and chunks == 2
        assert (fwd, bwd) == (({"all_gather": 2}, {"reduce_scatter": 2}) if kind == "column"
                              else ({"reduce_scatter": 2}, {"all_gather": 2}))


def _check_unfused_comm_refuses():
    comm = mesh(2).tp_comm
    a, b = torch.ones(1, 2, 4), torch.ones(4, 4)
    for call in (comm.all_gather_matmul, comm.matmul_reduce_scatter):
        with pytest.raises(NotImplementedError, match="without enable_symm_mem"):
            call(a, b, 1)


def test_fused_ops_need_enable_symm_mem():
    _dist.run(2, _check_unfused_comm_refuses)


def test_set_overlap_refuses_bad_chunks():
    layer = torch.nn.Sequential()
    for bad in (0, -1, 1.5):
        with pytest.raises(ValueError, match="must be a positive integer"):
            set_overlap(layer, True, bad)
