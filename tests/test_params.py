"""ParamSpec's replicated blocks and sync_grads' ``grad_reduce``: the gradient of an
element is summed over exactly the ranks that hold it, in one all-reduce per dtype,
without sub-groups; and materialize_ keeps tied parameters tied."""

import pytest
import torch
from torch import nn

import raytp
from raytp import Replicate, Shard
from raytp.comm import count_collectives
from raytp.nn import ColumnParallelLinear, ParallelLMHead, VocabParallelEmbedding
from raytp.params import ParamSpec, materialize_, set_spec

import _dist
from helpers import F64, mesh, randn, world

ROWS = 16


def _blocks(n):
    """A block split over every rank, one replicated everywhere, one shared by pairs."""
    return ((8, n), (4, 1), (4, min(2, n)))


def _whole_gradient(fulls, blocks, n):
    """The gradient sync_grads must produce, as one full tensor: a chunk of a block held
    by one rank is that rank's; a chunk held by several is the sum of theirs."""
    whole, start = torch.zeros_like(fulls[0]), 0
    for size, n_shards in blocks:
        rows = size // n_shards
        for r in range(n):
            lo = start + (r * n_shards // n) * rows
            if n_shards == n:
                whole[lo:lo + rows] = fulls[r][lo:lo + rows]
            else:
                whole[lo:lo + rows] += fulls[r][lo:lo + rows]
        start += size
    return whole


def _check_sync_blocks():
    rank, n = world()
    m = mesh(n)
    blocks = _blocks(n)
    spec = ParamSpec(Shard(0), torch.Size((ROWS, 3)), n, blocks, grad_reduce=m.tp_comm)
    fulls = [randn(ROWS, 3, seed=10 + r) for r in range(n)]  # rank r's gradient, full-shaped
    sharded = set_spec(nn.Parameter(spec.shard(torch.zeros(ROWS, 3, dtype=torch.float64), rank)), spec)
    sharded.grad = spec.shard(fulls[rank], rank)
    replicated = []
    for dtype in (torch.float64, torch.float32):
        p = set_spec(nn.Parameter(torch.zeros(5, dtype=dtype)),
                     ParamSpec(Replicate(), torch.Size((5,)), n, grad_reduce=m.tp_comm))
        p.grad = randn(5, seed=20 + rank).to(dtype)
        replicated.append(p)
    with count_collectives() as c:
        raytp.sync_grads([sharded, *replicated], m)
    assert c.by_kind() == ({"all_reduce": 2} if n > 1 else {})  # one per dtype, all params in it
    whole = _whole_gradient(fulls, blocks, n)
    torch.testing.assert_close(sharded.grad, spec.shard(whole, rank), **F64)
    replicated_sum = sum(randn(5, seed=20 + r) for r in range(n))
    torch.testing.assert_close(replicated[0].grad, replicated_sum, **F64)
    torch.testing.assert_close(replicated[1].grad, replicated_sum.float())
    expect_norm = torch.cat([whole.flatten(), replicated_sum, replicated_sum.float().double()]).norm()
    norm = raytp.grad_norm([sharded, *replicated], m)
    torch.testing.assert_close(norm.double(), expect_norm, rtol=1e-6, atol=0)


@pytest.mark.parametrize("n", [1, 2, 4])
def test_sync_grads_sums_replicated_blocks_over_their_holders(n):
    _dist.run(n, _check_sync_blocks)


def test_reduce_buffer_round_trip():
    """The buffer holds each replicated block's chunk at its index, zeros elsewhere."""
    spec = ParamSpec(Shard(1), torch.Size((2, ROWS)), 4, _blocks(4))
    full = torch.arange(2 * ROWS, dtype=torch.float64).view(2, ROWS)
    local = spec.shard(full, 3)  # rank 3: chunk 3 of block 0, block 1 whole, chunk 1 of block 2
    buffer = spec.reduce_buffer(local, 3)
    assert buffer.shape == (2, 8)  # blocks 1 and 2 at full size; block 0 left out
    torch.testing.assert_close(buffer[:, :4], full[:, 8:12])
    torch.testing.assert_close(buffer[:, 4:6], torch.zeros(2, 2, dtype=torch.float64))
    torch.testing.assert_close(buffer[:, 6:], full[:, 14:16])
    target = torch.zeros_like(local)
    spec.read_reduce_buffer_(buffer * 2, target, 3)
    torch.testing.assert_close(target[:, 2:], local[:, 2:] * 2)  # replicated parts read back
    torch.testing.assert_close(target[:, :2], torch.zeros(2, 2, dtype=torch.float64))  # others untouched


def _check_bad_blocks():
    m = mesh(4)
    with pytest.raises(ValueError, match="block sharded 3 ways cannot map onto tp=4"):
        ColumnParallelLinear(4, 12, mesh=m, blocks=((8, 4), (4, 3)))
    with pytest.raises(ValueError, match="out_features block=6 is not divisible by tp=4"):
        ColumnParallelLinear(4, 14, mesh=m, blocks=(8, (6, 4)))
    with pytest.raises(ValueError, match="out_features block=5 is not divisible by its n_shards=2"):
        ColumnParallelLinear(4, 13, mesh=m, blocks=(8, (5, 2)))
    with pytest.raises(ValueError, match="grad_reduce must be its TP group"):
        ParamSpec(Shard(0), torch.Size((8,)), 2, grad_reduce=m.tp_comm)


def test_bad_blocks():
    _dist.run(4, _check_bad_blocks)


def _check_materialize_keeps_ties():
    m = mesh(2)
    model = nn.Module()
    model.embed = VocabParallelEmbedding(9, 4, mesh=m, device="meta")
    model.head = ParallelLMHead(4, 9, mesh=m, tied_to=model.embed, device="meta")
    materialize_(model, "cpu")
    assert model.head.weight is model.embed.weight
    assert model.embed.weight.device.type == "cpu"


def test_materialize_keeps_tied_parameters_tied():
    _dist.run(2, _check_materialize_keeps_ties)
