"""Gradient sync and the global gradient norm over TP and DP."""

import pytest
import torch
from test_mlp import RefMLP
from torch import nn

import raytp
from raytp import Replicate
from raytp.nn import ColumnParallelLinear, ParallelMLP, RowParallelLinear

import _dist
from helpers import assert_params_match, mesh, world


def _rand(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


class Mixed(nn.Module):
    """Sharded, replicated-with-partial-grad and plain replicated parameters together."""

    def __init__(self, mesh_or_none):
        super().__init__()
        if mesh_or_none is None:
            self.a = nn.Linear(6, 8, dtype=torch.float64)
            self.b = nn.Linear(8, 6, dtype=torch.float64)
        else:
            m = mesh_or_none
            self.a = ColumnParallelLinear(6, 8, mesh=m, weight_placement=Replicate(),
                                          dtype=torch.float64)
            self.b = RowParallelLinear(8, 6, mesh=m, dtype=torch.float64)
        self.scale = nn.Parameter(torch.ones(6, dtype=torch.float64))  # no spec: replicated

    def forward(self, x):
        return self.b(torch.tanh(self.a(x))) * self.scale


def _check_clip(max_norm):
    rank, n = world()
    m = mesh(n)
    torch.manual_seed(0)
    ref = Mixed(None)
    torch.manual_seed(0)
    model = Mixed(m)
    assert_params_match(model, ref, m.tp_rank, rtol=0, atol=0)
    x = _rand(4, 6, seed=1)
    for net in (model, ref):
        (net(x) ** 2).sum().backward()
    raytp.sync_grads(model, m)
    norm = raytp.clip_grad_norm_(model.parameters(), max_norm, m)
    ref_norm = torch.nn.utils.clip_grad_norm_(ref.parameters(), max_norm)
    torch.testing.assert_close(norm.double(), ref_norm, rtol=1e-6, atol=0)
    assert_params_match(model, ref, m.tp_rank, grads=True, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("n", [1, 2, 4])
@pytest.mark.parametrize("max_norm", [1e-3, 1e6])  # clipped, and left alone
def test_clip_grad_norm_counts_each_parameter_once(n, max_norm):
    _dist.run(n, _check_clip, max_norm)


def _check_data_parallel(tp, dp):
    """dp x tp on a split batch equals one device on the whole batch."""
    rank, n = world()
    m = mesh(tp, dp)
    assert (m.tp_rank, m.dp_rank) == (rank % tp, rank // tp)
    torch.manual_seed(0)
    mlp = ParallelMLP(6, 16, mesh=m, dtype=torch.float64)
    torch.manual_seed(0)
    ref = RefMLP(6, 16, "gelu", True)
    x = _rand(4 * dp, 6, seed=1)
    (ref(x) ** 2).mean().backward()
    local_x = x.chunk(dp)[m.dp_rank]
    (mlp(local_x) ** 2).mean().backward()
    raytp.sync_grads(mlp, m)
    assert_params_match(mlp, ref, m.tp_rank, grads=True)
    for net in (mlp, ref):
        raytp.SGD(lr=0.1).build(net.parameters()).step()
    assert_params_match(mlp, ref, m.tp_rank)


@pytest.mark.parametrize("tp,dp", [(1, 2), (2, 2), (1, 4)])
def test_dp_times_tp_equals_one_device(tp, dp):
    _dist.run(tp * dp, _check_data_parallel, tp, dp)


@pytest.mark.parametrize("bad", [{"lr": -1.0}, {"lr": float("nan")}, {"weight_decay": -0.1}])
def test_optimizer_specs_reject_bad_hyperparameters(bad):
    with pytest.raises(ValueError, match="must be >= 0"):
        raytp.AdamW(**bad)
    with pytest.raises(ValueError, match="must be >= 0"):
        raytp.SGD(**bad)
