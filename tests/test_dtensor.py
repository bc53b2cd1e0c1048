"""DTensor: distribution from one rank, every redistribute transition, torch interop."""

import pytest
import torch

from raytp import DTensor, Partial, Replicate, Shard
from raytp.comm import count_collectives
from raytp.dtensor import normalize

import _dist
from helpers import F64, mesh, world

WORLDS = [1, 2, 4]


def _full(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2 * n, 3 * n, 4, generator=g, dtype=torch.float64)


def _check_from_full(placement):
    rank, n = world()
    m = mesh(n)
    full = _full(n)
    with count_collectives() as c:
        dt = DTensor.from_full(full if rank == 0 else None, m, placement, src=0)
    assert dt.global_shape == full.shape and dt.dtype == torch.float64
    if isinstance(placement, Shard):
        torch.testing.assert_close(dt.local, full.chunk(n, placement.dim)[rank], **F64)
        assert c.count("broadcast") == (n > 1) and c.count("scatter") == (n > 1)  # meta + data
    elif isinstance(placement, Replicate):
        torch.testing.assert_close(dt.local, full, **F64)
    else:
        torch.testing.assert_close(dt.local, full if rank == 0 else torch.zeros_like(full), **F64)
    torch.testing.assert_close(dt.full(), full, **F64)


@pytest.mark.parametrize("n", WORLDS)
@pytest.mark.parametrize("placement", [Shard(0), Shard(1), Shard(-1), Replicate(), Partial()])
def test_from_full_then_full(n, placement):
    _dist.run(n, _check_from_full, placement)


def _check_from_full_other_source(placement):
    """The full tensor on TP rank 1 of each of two DP groups (global ranks 1 and 3):
    each TP group distributes its own, and only its own, tensor."""
    rank, _ = world()
    m = mesh(2, 2)
    full = _full(2, seed=10 + m.dp_rank)
    dt = DTensor.from_full(full if m.tp_rank == 1 else None, m, placement, src=1)
    expected = {Shard: lambda: full.chunk(2, placement.dim)[m.tp_rank], Replicate: lambda: full,
                Partial: lambda: full if m.tp_rank == 1 else torch.zeros_like(full)}
    torch.testing.assert_close(dt.local, expected[type(placement)](), **F64)
    torch.testing.assert_close(dt.full(), full, **F64)


@pytest.mark.parametrize("placement", [Shard(0), Shard(-1), Replicate(), Partial()])
def test_from_full_from_another_rank_under_dp(placement):
    _dist.run(4, _check_from_full_other_source, placement)


def _make(placement, full, m, rank, n):
    if isinstance(placement, Shard):
        return DTensor(full.chunk(n, placement.dim)[rank].clone(), m, placement, full.shape)
    if isinstance(placement, Replicate):
        return DTensor(full.clone(), m, placement, full.shape)
    # a Partial tensor whose parts differ per rank but sum to full
    part = full * (rank + 1) / (n * (n + 1) / 2)
    return DTensor(part, m, placement, full.shape)


TRANSITIONS = [
    (Partial(), Replicate(), "all_reduce"),
    (Partial(), Shard(1), "reduce_scatter"),
    (Shard(0), Replicate(), "all_gather"),
    (Shard(2), Replicate(), "all_gather"),
    (Replicate(), Shard(1), None),
    (Shard(0), Shard(1), "all_to_all"),
    (Shard(1), Shard(0), "all_to_all"),
    (Shard(-1), Shard(0), "all_to_all"),  # a negative dim is counted from the end
    (Shard(0), Shard(-1), "all_to_all"),
    (Shard(-1), Shard(2), None),  # the same layout: nothing to do
]


def _check_transition(src, dst, collective):
    rank, n = world()
    m = mesh(n)
    full = _full(n, seed=3)
    dt = _make(src, full, m, rank, n)
    dt.local.requires_grad_()
    with count_collectives() as c:
        out = dt.redistribute(dst)
    assert out.placement == normalize(dst, full.dim()) and out.global_shape == full.shape
    torch.testing.assert_close(out.full(), full, **F64)
    if n > 1:
        assert c.by_kind() == ({collective: 1} if collective else {}), c.by_kind()
    # round trip back (Partial cannot be reached again; Replicate stands in for it)
    back = out.redistribute(src if not isinstance(src, Partial) else Replicate())
    torch.testing.assert_close(back.full(), full, **F64)
    # differentiable: the loss is the sum of the whole tensor (each rank backpropagates its
    # own part; a replicated output counts once), so every local value's gradient is 1
    out.local.sum().backward()
    torch.testing.assert_close(dt.local.grad, torch.ones_like(dt.local), **F64)


@pytest.mark.parametrize("n", WORLDS)
@pytest.mark.parametrize("src,dst,collective", TRANSITIONS)
def test_redistribute(n, src, dst, collective):
    _dist.run(n, _check_transition, src, dst, collective)


def _check_to_torch(placement):
    from torch.distributed.tensor import distribute_tensor

    rank, n = world()
    m = mesh(n)
    full = _full(n, seed=4)
    ours = DTensor.from_full(full, m, placement)
    theirs = ours.to_torch()
    assert theirs.shape == full.shape
    torch.testing.assert_close(theirs.full_tensor(), full, **F64)
    torch.testing.assert_close(theirs.to_local(), ours.local, **F64)
    # torch's own distribution gives the same local shard, and converts back (torch does
    # not distribute a tensor as Partial: ours, converted, stands in for it)
    from raytp.placement import to_torch_placement

    reference = theirs if isinstance(placement, Partial) else \
        distribute_tensor(full, m.torch_mesh(), [to_torch_placement(placement)])
    torch.testing.assert_close(reference.to_local(), ours.local, **F64)
    back = DTensor.from_torch(reference, m)
    assert back.placement == normalize(placement, full.dim()) and back.global_shape == full.shape
    torch.testing.assert_close(back.full(), full, **F64)


@pytest.mark.parametrize("n", WORLDS)
@pytest.mark.parametrize("placement", [Shard(0), Shard(1), Shard(-1), Replicate(), Partial()])
def test_to_torch_agrees_with_torch_dtensor(n, placement):
    _dist.run(n, _check_to_torch, placement)


def _check_uneven():
    rank, n = world()
    m = mesh(n)
    full = torch.zeros(5, 3)
    with pytest.raises(ValueError, match=r"size of dim 0=5 is not divisible by tp=2"):
        DTensor.from_full(full if rank == 0 else None, m, Shard(0))
    dt = DTensor.from_full(full if rank == 0 else None, m, Replicate())
    with pytest.raises(ValueError, match=r"size of dim 0=5 is not divisible by tp=2"):
        dt.redistribute(Shard(0))
    with pytest.raises(ValueError, match="does not match global shape"):
        DTensor(torch.zeros(2, 3), m, Shard(0), (6, 3))
    with pytest.raises(ValueError, match="not supported"):
        dt.redistribute(Partial())


def test_uneven_sizes_are_value_errors():
    _dist.run(2, _check_uneven)
