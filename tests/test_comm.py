"""Region ops and collectives against the same math done on one process."""

import pytest
import torch

from raytp import comm
from raytp.comm import functional as cf
from raytp.comm.backend import TorchCommunicator

import _dist
from helpers import F64, mesh, world

WORLDS = [1, 2, 4]


def _inputs(world_size, shape, seed=0):
    """Every rank's input, the same on all ranks: inputs[r] is rank r's."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=g, dtype=torch.float64) for _ in range(world_size)]


def _check_region_op(op_name, dim):
    rank, n = world()
    tp = mesh(n).tp_comm
    shape = (2 * n, 4 * n, 3 * n)  # divisible along every dim
    xs = _inputs(n, shape, seed=1)
    gs = _inputs(n, shape, seed=2)  # upstream gradients, per rank (before the op's output shape)
    x = xs[rank].clone().requires_grad_()
    y = getattr(comm, op_name)(x, tp, *([dim] if dim is not None else []))
    full_x = torch.cat(xs, dim=dim) if dim is not None else None
    total_x = sum(xs)
    if op_name == "copy_to":
        expect, grad_out = xs[rank], gs
        expect_grad = sum(g for g in grad_out)
    elif op_name == "reduce_from":
        expect, grad_out = total_x, gs
        expect_grad = grad_out[rank]
    elif op_name == "scatter_to":
        expect = xs[rank].chunk(n, dim)[rank]
        grad_out = [g.chunk(n, dim)[r] for r, g in enumerate(gs)]
        expect_grad = torch.cat(grad_out, dim)
    elif op_name == "gather_from":
        expect = full_x
        grad_out = [torch.cat(gs, dim)] * n  # replicated output, replicated gradient
        expect_grad = grad_out[rank].chunk(n, dim)[rank]
    elif op_name == "all_gather_seq":
        expect = full_x
        grad_out = [torch.cat([g] * n, dim) * (r + 1) for r, g in enumerate(gs)]  # partial grads
        expect_grad = sum(grad_out).chunk(n, dim)[rank]
    elif op_name == "reduce_scatter_seq":
        expect = total_x.chunk(n, dim)[rank]
        grad_out = [g.chunk(n, dim)[r] for r, g in enumerate(gs)]
        expect_grad = torch.cat(grad_out, dim)
    torch.testing.assert_close(y, expect, **F64)
    y.backward(grad_out[rank])
    torch.testing.assert_close(x.grad, expect_grad, **F64)
    torch.testing.assert_close(x.detach(), xs[rank], **F64)  # the input is not mutated


@pytest.mark.parametrize("n", WORLDS)
@pytest.mark.parametrize("op_name,dim", [
    ("copy_to", None), ("reduce_from", None),
    ("scatter_to", -1), ("scatter_to", 1), ("gather_from", -1), ("gather_from", 0),
    ("all_gather_seq", 1), ("reduce_scatter_seq", 1), ("reduce_scatter_seq", 0),
])
def test_region_op(n, op_name, dim):
    _dist.run(n, _check_region_op, op_name, dim)


def _check_all_to_all(split_dim, cat_dim):
    rank, n = world()
    tp = mesh(n).tp_comm
    full = _inputs(1, (4 * n, 2 * n, 3 * n))[0]
    x = full.chunk(n, cat_dim)[rank].clone().requires_grad_()
    y = comm.all_to_all(x, tp, split_dim, cat_dim)
    torch.testing.assert_close(y, full.chunk(n, split_dim)[rank], **F64)
    grad_full = _inputs(1, full.shape, seed=5)[0]
    y.backward(grad_full.chunk(n, split_dim)[rank])
    torch.testing.assert_close(x.grad, grad_full.chunk(n, cat_dim)[rank], **F64)


@pytest.mark.parametrize("n", WORLDS)
@pytest.mark.parametrize("split_dim,cat_dim", [(0, 1), (1, 0), (-1, 0)])
def test_all_to_all(n, split_dim, cat_dim):
    _dist.run(n, _check_all_to_all, split_dim, cat_dim)


def _check_reduce_scatter_fallback():
    rank, n = world()
    tp = mesh(n).tp_comm
    fallback = TorchCommunicator(tp.group, "tp-fallback", tp.device, native_reduce_scatter=False)
    xs = _inputs(n, (4 * n, 3))
    for c in (tp, fallback):
        out = cf.reduce_scatter(xs[rank], c, dim=0)
        torch.testing.assert_close(out, sum(xs).chunk(n, 0)[rank], **F64)
    assert fallback.native_reduce_scatter is False


@pytest.mark.parametrize("n", [2, 4])
def test_reduce_scatter_fallback(n):
    _dist.run(n, _check_reduce_scatter_fallback)


def _check_reduce_scatter_falls_back_when_refused():
    from raytp.comm import backend

    rank, n = world()
    tp = mesh(n).tp_comm
    native = backend._reduce_scatter_single
    calls = []

    def refuse(*args, **kwargs):  # what an old gloo build answers
        calls.append(1)
        raise RuntimeError("ProcessGroupGloo does not support reduce_scatter")

    backend._reduce_scatter_single = refuse
    try:
        auto = TorchCommunicator(tp.group, "tp-auto", tp.device)
        xs = _inputs(n, (4 * n, 3))
        for _ in range(2):  # refused once, then the fallback for good
            out = cf.reduce_scatter(xs[rank], auto, dim=0)
            torch.testing.assert_close(out, sum(xs).chunk(n, 0)[rank], **F64)
        assert auto.native_reduce_scatter is False and len(calls) == 1
        strict = TorchCommunicator(tp.group, "tp-native", tp.device, native_reduce_scatter=True)
        with pytest.raises(RuntimeError, match="does not support reduce_scatter"):
            cf.reduce_scatter(xs[rank], strict, dim=0)
    finally:
        backend._reduce_scatter_single = native


@pytest.mark.parametrize("n", [2, 4])
def test_reduce_scatter_falls_back_when_the_backend_refuses(n):
    _dist.run(n, _check_reduce_scatter_falls_back_when_refused)


def _check_counter_sees_other_threads():
    import threading

    rank, n = world()
    tp = mesh(n).tp_comm
    x = torch.ones(4 * n, dtype=torch.float64)
    # on GPUs autograd runs a CUDA backward on a thread of its own: its collectives must
    # still count in the step that the main thread counts
    with comm.count_collectives() as c:
        thread = threading.Thread(target=lambda: comm.reduce_from(x, tp))
        thread.start()
        thread.join()
    assert c.by_kind() == ({"all_reduce": 1} if n > 1 else {}), c.by_kind()


@pytest.mark.parametrize("n", [1, 2])
def test_counter_counts_collectives_of_other_threads(n):
    _dist.run(n, _check_counter_sees_other_threads)


def _check_counter():
    rank, n = world()
    tp = mesh(n).tp_comm
    x = torch.ones(8 * n, dtype=torch.float32, requires_grad=True)
    with comm.count_collectives() as c:
        with comm.comm_tag("layer A"):
            y = comm.reduce_from(comm.copy_to(x, tp), tp)
        y = comm.reduce_scatter_seq(y, tp, 0)
        y.sum().backward()
    assert c.by_kind() == {"all_reduce": 2, "reduce_scatter": 1, "all_gather": 1}, c.by_kind()
    assert c.bytes["all_reduce"] == 2 * 8 * n * 4
    assert c.bytes["reduce_scatter"] == 8 * n * 4 and c.bytes["all_gather"] == 8 * 4
    assert c.records[0].tag == "layer A" and c.records[1].tag is None
    seqs = [r.seq for r in c.records]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
    return seqs


def test_counter_counts_kinds_bytes_and_sequence():
    seqs = _dist.run(2, _check_counter)
    assert seqs[0] == seqs[1]  # sequence numbers agree across ranks


def _check_counter_single_rank_is_silent():
    tp = mesh(1).tp_comm
    with comm.count_collectives() as c:
        comm.reduce_from(comm.copy_to(torch.ones(3, requires_grad=True), tp), tp).sum().backward()
    assert c.count() == 0


def test_single_rank_issues_no_collectives():
    _dist.run(1, _check_counter_single_rank_is_silent)


def _check_uneven_is_value_error():
    _, n = world()
    tp = mesh(n).tp_comm
    with pytest.raises(ValueError, match=r"size of dim 0=5 is not divisible by tp=2"):
        comm.scatter_to(torch.ones(5, 2), tp, 0)


def test_uneven_split_is_value_error():
    _dist.run(2, _check_uneven_is_value_error)
