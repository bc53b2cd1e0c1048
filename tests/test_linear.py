"""Column- and row-parallel linear layers against nn.Linear on one process:
forward, input gradient, weight gradients, and the parameters after one SGD and
one AdamW step, for every option, at tp 1, 2 and 4 (float64)."""

import pytest
import torch
from torch import nn

import raytp
from raytp import Replicate, Shard
from raytp.comm import count_collectives
from raytp.nn import ColumnParallelLinear, RowParallelLinear

import _dist
from helpers import F64, assert_params_match, mesh, world

WORLDS = [1, 2, 4]
OPTIMIZERS = [raytp.SGD(lr=0.1, momentum=0.9), raytp.AdamW(lr=0.01, weight_decay=0.1)]


def _rand(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _run_parity(cls, opts, in_shape, out_f=None):
    """One forward, backward and optimizer step of ``cls`` vs nn.Linear; returns the
    collective counts of the forward and the backward."""
    rank, n = world()
    m = mesh(n)
    in_f, out_f = 8 * n, out_f or 12 * n
    counts = {}
    for spec in OPTIMIZERS:
        torch.manual_seed(0)
        ref = nn.Linear(in_f, out_f, bias=opts.get("bias", True), dtype=torch.float64)
        layer = cls.from_linear(ref, m, **{k: v for k, v in opts.items() if k != "bias"})
        assert_params_match(layer, ref, m.tp_rank)

        x_full = _rand(*in_shape, in_f, seed=1)
        grad_out = _rand(*in_shape, out_f, seed=2)
        x_ref = x_full.clone().requires_grad_()
        y_ref = ref(x_ref)
        (y_ref * grad_out).sum().backward()

        sharded_input = cls is RowParallelLinear and opts.get("input_is_parallel", True)
        x = (x_full.chunk(n, -1)[m.tp_rank] if sharded_input else x_full).clone().requires_grad_()
        with count_collectives() as fwd:
            y = layer(x)
        sharded_output = cls is ColumnParallelLinear and not opts.get("gather_output", False)
        g = grad_out.chunk(n, -1)[m.tp_rank] if sharded_output else grad_out
        if cls is RowParallelLinear and not opts.get("reduce_output", True):
            y_check = raytp.comm.reduce_from(y.detach(), m.tp_comm)  # a Partial output sums to y
        else:
            y_check = y
        torch.testing.assert_close(y_check, y_ref.chunk(n, -1)[m.tp_rank] if sharded_output
                                   else y_ref, **F64)
        with count_collectives() as bwd:
            (y * g).sum().backward()
        x_grad_ref = x_ref.grad.chunk(n, -1)[m.tp_rank] if sharded_input else x_ref.grad
        torch.testing.assert_close(x.grad, x_grad_ref, **F64)

        raytp.sync_grads(layer, m)
        assert_params_match(layer, ref, m.tp_rank, grads=True)
        assert raytp.grad_norm(layer, m).item() == pytest.approx(
            torch.cat([p.grad.flatten() for p in ref.parameters()]).norm().item(), rel=1e-6)

        opt, opt_ref = spec.build(layer.parameters()), spec.build(ref.parameters())
        opt.step()
        opt_ref.step()
        assert_params_match(layer, ref, m.tp_rank)
        counts = {"forward": fwd.by_kind(), "backward": bwd.by_kind()}
    return counts


COLUMN_OPTIONS = [
    {},
    {"bias": False},
    {"gather_output": True},
    {"weight_placement": Replicate()},
    {"bias_placement": Replicate()},
    {"weight_placement": Replicate(), "bias_placement": Replicate(), "gather_output": True},
    {"blocks": None},
]
ROW_OPTIONS = [
    {},
    {"bias": False},
    {"input_is_parallel": False},
    {"reduce_output": False},
    {"reduce_output": False, "bias": False},
    {"weight_placement": Replicate()},
    {"bias_placement": Shard(0)},
    {"weight_placement": Replicate(), "input_is_parallel": False},
]


@pytest.mark.parametrize("n", WORLDS)
@pytest.mark.parametrize("opts", COLUMN_OPTIONS, ids=str)
def test_column_parallel_matches_linear(n, opts):
    counts = _dist.run(n, _run_parity, ColumnParallelLinear, opts, (3, 5))[0]
    if n > 1:
        assert counts["forward"] == ({"all_gather": 1} if opts.get("gather_output") else {})
        assert counts["backward"].get("all_reduce") == 1


@pytest.mark.parametrize("n", WORLDS)
@pytest.mark.parametrize("opts", ROW_OPTIONS, ids=str)
def test_row_parallel_matches_linear(n, opts):
    counts = _dist.run(n, _run_parity, RowParallelLinear, opts, (3, 5))[0]
    if n > 1:
        reduce = opts.get("reduce_output", True)
        assert counts["forward"].get("all_reduce", 0) == int(reduce)
        assert counts["backward"].get("all_reduce", 0) == 0


@pytest.mark.parametrize("cls", [ColumnParallelLinear, RowParallelLinear])
def test_two_dim_input(cls):
    _dist.run(2, _run_parity, cls, {}, (6,))


def test_row_output_size_need_not_divide():
    _dist.run(4, _run_parity, RowParallelLinear, {}, (3, 5), 7)


def _check_fused_blocks():
    """A fused [gate | up] layer holds the slice of each block, in block order."""
    rank, n = world()
    m = mesh(n)
    torch.manual_seed(0)
    ref = nn.Linear(8, 2 * 4 * n, dtype=torch.float64)
    layer = ColumnParallelLinear.from_linear(ref, m, blocks=(4 * n, 4 * n))
    gate, up = ref.weight.chunk(2, 0)
    expect = torch.cat([gate.chunk(n, 0)[rank], up.chunk(n, 0)[rank]])
    torch.testing.assert_close(layer.weight.detach(), expect, **F64)
    x = _rand(5, 8, seed=1)
    y_gate, y_up = layer(x).chunk(2, -1)
    ref_gate, ref_up = ref(x).chunk(2, -1)
    torch.testing.assert_close(y_gate, ref_gate.chunk(n, -1)[rank], **F64)
    torch.testing.assert_close(y_up, ref_up.chunk(n, -1)[rank], **F64)


@pytest.mark.parametrize("n", [2, 4])
def test_fused_blocks(n):
    _dist.run(n, _check_fused_blocks)


def _check_same_seed_same_weights(cls):
    """Built from the same seed, tp=N holds exactly the shards of nn.Linear's weights
    (and so of tp=1's)."""
    rank, n = world()
    m = mesh(n)
    torch.manual_seed(7)
    ref = nn.Linear(8 * n, 4 * n, dtype=torch.float64)
    torch.manual_seed(7)
    layer = cls(8 * n, 4 * n, mesh=m, dtype=torch.float64)
    assert_params_match(layer, ref, m.tp_rank, rtol=0, atol=0)


@pytest.mark.parametrize("n", WORLDS)
@pytest.mark.parametrize("cls", [ColumnParallelLinear, RowParallelLinear])
def test_initialization_matches_one_device(n, cls):
    _dist.run(n, _check_same_seed_same_weights, cls)


def _check_bad_sizes():
    m = mesh(2)
    with pytest.raises(ValueError, match=r"out_features=5 is not divisible by tp=2"):
        ColumnParallelLinear(4, 5, mesh=m)
    with pytest.raises(ValueError, match=r"in_features=7 is not divisible by tp=2"):
        RowParallelLinear(7, 4, mesh=m)
    with pytest.raises(ValueError, match=r"placement Shard\(dim=1\) is not one of"):
        ColumnParallelLinear(4, 4, mesh=m, weight_placement=Shard(1))
    with pytest.raises(ValueError, match=r"reduce_output=False needs a Replicate\(\) bias"):
        RowParallelLinear(4, 4, mesh=m, reduce_output=False, bias_placement=Shard(0))
    with pytest.raises(ValueError, match="gather_output would interleave"):
        ColumnParallelLinear(4, 8, mesh=m, blocks=(4, 4), gather_output=True)


def test_bad_sizes_and_placements():
    _dist.run(2, _check_bad_sizes)
