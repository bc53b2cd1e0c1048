"""raytp.parallelize on plain modules: the same function, sharded."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import raytp
from raytp.nn import ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding

import _dist
from helpers import F64, assert_params_match, check_parity, mesh, world

WORLDS = [1, 2, 4]


class Block(nn.Module):
    def __init__(self, d, f):
        super().__init__()
        self.up = nn.Linear(d, f, dtype=torch.float64)
        self.down = nn.Linear(f, d, dtype=torch.float64)

    def forward(self, x):
        return x + self.down(F.gelu(self.up(x)))


class Net(nn.Module):
    """Embedding, two residual MLP blocks, a gathered head: every style once."""

    def __init__(self, vocab=11, d=8, f=16, classes=12):
        super().__init__()
        self.embed = nn.Embedding(vocab, d, dtype=torch.float64)
        self.blocks = nn.ModuleList([Block(d, f) for _ in range(2)])
        self.norm = nn.LayerNorm(d, dtype=torch.float64)
        self.head = nn.Linear(d, classes, dtype=torch.float64)

    def forward(self, ids):
        x = self.embed(ids)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


PLAN = {"embed": "vocab", "blocks.*.up": "colwise", "blocks.*.down": "rowwise",
        "head": "colwise_gather"}


def _check_net(ids_shape):
    rank, n = world()
    m = mesh(n)
    torch.manual_seed(0)
    ref = Net()
    torch.manual_seed(0)
    model = raytp.parallelize(Net(), m, PLAN)
    assert isinstance(model.embed, VocabParallelEmbedding)
    assert isinstance(model.blocks[1].up, ColumnParallelLinear)
    assert isinstance(model.blocks[0].down, RowParallelLinear)
    assert model.head.gather_output
    assert_params_match(model, ref, m.tp_rank)
    ids = torch.randint(0, 11, ids_shape, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(model(ids), ref(ids), **F64)
    for net in (model, ref):
        F.cross_entropy(net(ids).reshape(-1, 12), ids.reshape(-1)).backward()
    raytp.sync_grads(model, m)
    assert_params_match(model, ref, m.tp_rank, grads=True)
    for spec in (raytp.SGD(lr=0.1, momentum=0.9), raytp.AdamW(lr=0.05)):  # on the same gradients
        for net in (model, ref):
            spec.build(net.parameters()).step()
        assert_params_match(model, ref, m.tp_rank)
    torch.testing.assert_close(model(ids), ref(ids), **F64)


@pytest.mark.parametrize("n", WORLDS)
@pytest.mark.parametrize("ids_shape", [(6,), (2, 5)], ids=["(B,H)", "(B,T,H)"])
def test_parallelized_net_computes_the_same(n, ids_shape):
    _dist.run(n, _check_net, ids_shape)


def _check_block_input_gradient(x_shape):
    """A float input through a parallelized block: forward, the input's gradient, the
    weights' gradients and one SGD and one AdamW step (check_parity)."""
    rank, n = world()
    torch.manual_seed(0)
    ref = Block(8, 16)
    torch.manual_seed(0)
    model = raytp.parallelize(Block(8, 16), mesh(n), {"up": "colwise", "down": "rowwise"})
    x = torch.randn(*x_shape, 8, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    check_parity(model, ref, x, local_in=lambda t: t, local_out=lambda t: t)


@pytest.mark.parametrize("n", WORLDS)
@pytest.mark.parametrize("x_shape", [(6,), (2, 5)], ids=["(B,H)", "(B,T,H)"])
def test_parallelized_block_input_gradient(n, x_shape):
    _dist.run(n, _check_block_input_gradient, x_shape)


def _check_plan_errors():
    m = mesh(2)
    with pytest.raises(ValueError, match=r"plan pattern 'blocks\.\*\.nope' matches no submodule"):
        raytp.parallelize(Net(), m, {"blocks.*.nope": "colwise"})
    with pytest.raises(ValueError, match=r"plan\['head'\] = 'diagonal' is not one of"):
        raytp.parallelize(Net(), m, {"head": "diagonal"})
    with pytest.raises(ValueError, match=r"'norm' is a LayerNorm; style 'colwise' needs an Linear"):
        raytp.parallelize(Net(), m, {"norm": "colwise"})
    with pytest.raises(ValueError, match=r"'blocks\.0\.up' matches more than one plan pattern"):
        raytp.parallelize(Net(), m, {"blocks.*.up": "colwise", "blocks.0.*": "colwise"})
    with pytest.raises(ValueError, match=r"'head' \(colwise\): out_features=7 is not divisible by tp=2"):
        raytp.parallelize(Net(classes=7), m, {"head": "colwise"})
    with pytest.raises(ValueError, match="non-empty dict"):
        raytp.parallelize(Net(), m, {})


def test_plan_errors_name_the_problem():
    _dist.run(2, _check_plan_errors)
