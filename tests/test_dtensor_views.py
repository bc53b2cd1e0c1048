"""Every parameter of a built model is a DTensor: ``raytp.dtensor.of(param, mesh)`` is a
view of the parameter (no copy) whose ``full()`` is exactly the tp=1 model's parameter,
fused Q/K/V and gate/up blocks included (key/value heads replicated when
n_kv_heads < tp); ``gather_parameter`` returns the same on the CPU; placements and
global shapes are those of column, row, vocabulary and replicated parameters."""

import functools

import pytest
import torch

from raytp import Replicate, Shard, dtensor
from raytp.comm import count_collectives
from raytp.dtensor import DTensor, gather_parameter, named_dtensors, of
from raytp.models import GPTConfig
from raytp.nn import padded_vocab
from raytp.placement import Layout

import _dist
from helpers import mesh, world

SMALL = {"vocab_size": 37, "n_layers": 2, "d_model": 32, "d_ff": 48, "max_seq_len": 16, "dtype": "float64"}
LLAMA = {"norm": "rmsnorm", "activation": "swiglu", "positions": "rope", "bias": False,
         "tie_embeddings": False, "n_heads": 8}
CONFIGS = {
    "gpt2": GPTConfig(**SMALL, n_heads=4),  # tied embeddings, biases, learned positions
    "llama-gqa": GPTConfig(**SMALL, **LLAMA, n_kv_heads=2),  # tp=4: 2 ranks per KV head
    "llama-kv1": GPTConfig(**SMALL, **LLAMA, n_kv_heads=1),  # every rank holds the one KV head
}
EXACT = {"rtol": 0, "atol": 0}


def _build(config):
    _, n = world()
    torch.manual_seed(0)
    return config.build(mesh(n))


def _state(config):
    return {name: p.detach().clone() for name, p in _build(config).named_parameters()}


@functools.cache
def _reference(name):
    return _dist.run(1, _state, CONFIGS[name])[0]


def _unpadded(name, full, ref):
    """``full`` cut to the tp=1 shape: a vocabulary padded for tp has zero rows past it."""
    if full.shape[0] != ref.shape[0]:
        assert name in ("embed.weight", "lm_head.weight"), name
        assert not full[ref.shape[0]:].any(), f"{name}: padding rows are not zeros"
        return full[: ref.shape[0]]
    return full


def _check_views(config, ref):
    _, n = world()
    m = mesh(n)
    model = _build(config)
    views = dict(named_dtensors(model, m))
    assert list(views) == [name for name, _ in model.named_parameters()]
    assert views.keys() == ref.keys()
    for name, param in model.named_parameters():
        view = views[name]
        assert view.local is param and view.local.data_ptr() == param.data_ptr(), name
        assert of(param, m).local is param
        full = view.full()
        assert tuple(full.shape) == tuple(view.global_shape), name
        torch.testing.assert_close(_unpadded(name, full, ref[name]), ref[name], **EXACT,
                                   msg=lambda msg, name=name: f"{name}: {msg}")
        gathered = gather_parameter(model, name, m)
        assert gathered.device.type == "cpu" and not gathered.requires_grad
        assert gathered.data_ptr() != param.data_ptr()  # a copy, even of a replicated parameter
        torch.testing.assert_close(_unpadded(name, gathered, ref[name]), ref[name], **EXACT)
    with torch.no_grad():  # the view writes through to the parameter
        views["norm.weight"].local.add_(1)
    torch.testing.assert_close(model.norm.weight.detach(), ref["norm.weight"] + 1, **EXACT)


@pytest.mark.parametrize("n", [2, 4])
@pytest.mark.parametrize("name", CONFIGS)
def test_full_of_every_parameter_is_the_tp1_parameter(name, n):
    _dist.run(n, _check_views, CONFIGS[name], _reference(name))


def _expected_layouts(config, tp):
    """``{name: (placement, global shape, blocks)}`` of layer 0 and the embeddings, from the config."""
    d, vocab, kv = config.d_model, padded_vocab(config.vocab_size, tp), config.n_kv_heads or config.n_heads
    kv_width, kv_shards = kv * (d // config.n_heads), min(kv, tp)
    qkv = ((d, tp), (kv_width, kv_shards), (kv_width, kv_shards))
    ffn = ((config.d_ff, tp), (config.d_ff, tp)) if config.activation == "swiglu" else ((config.d_ff, tp),)
    layouts = {
        "embed.weight": (Shard(0), (vocab, d), ((vocab, tp),)),  # vocabulary-parallel
        "layers.0.attn.qkv.weight": (Shard(0), (d + 2 * kv_width, d), qkv),  # column, fused
        "layers.0.attn.proj.weight": (Shard(1), (d, d), ((d, tp),)),  # row
        "layers.0.mlp.fc_in.weight": (Shard(0), (sum(s for s, _ in ffn), d), ffn),  # column
        "layers.0.mlp.fc_out.weight": (Shard(1), (d, config.d_ff), ((config.d_ff, tp),)),  # row
        "layers.0.mlp_norm.weight": (Replicate(), (d,), ()),
        "norm.weight": (Replicate(), (d,), ()),
    }
    if config.bias:
        layouts["layers.0.attn.qkv.bias"] = (Shard(0), (d + 2 * kv_width,), qkv)
        layouts["layers.0.attn.proj.bias"] = (Replicate(), (d,), ())  # added once, after the reduce
    if config.positions == "learned":
        layouts["pos_embed.weight"] = (Replicate(), (config.max_seq_len, d), ())
    if not config.tie_embeddings:
        layouts["lm_head.weight"] = (Shard(0), (vocab, d), ((vocab, tp),))
    return layouts


def _check_layouts(config):
    _, n = world()
    m = mesh(n)
    views = dict(named_dtensors(_build(config), m))
    for name, (placement, shape, blocks) in _expected_layouts(config, n).items():
        view = views[name]
        assert (view.placement, tuple(view.global_shape), view.blocks) == (placement, shape, blocks), \
            f"{name}: {view}"
        assert view.placements == (placement,)
    # at tp=1 the DTensor is the whole parameter; else a plain shard converts to torch's DTensor
    qkv = views["layers.0.attn.qkv.weight"]
    if n > 1:
        with pytest.raises(ValueError, match="redistributes only to Replicate"):
            qkv.redistribute(Shard(1))
        with pytest.raises(ValueError, match="torch's DTensor has no layout of blocks"):
            qkv.to_torch()
    proj = views["layers.0.attn.proj.weight"]
    torch.testing.assert_close(proj.to_torch().full_tensor(), proj.full(), **EXACT)
    torch.testing.assert_close(qkv.redistribute(Replicate()).local, qkv.full(), **EXACT)


@pytest.mark.parametrize("n", [1, 2, 4])
@pytest.mark.parametrize("name", CONFIGS)
def test_placements_and_global_shapes(name, n):
    _dist.run(n, _check_layouts, CONFIGS[name])


def _check_gather_collectives_and_errors():
    _, n = world()
    m = mesh(n)
    model = _build(CONFIGS["gpt2"])
    with count_collectives() as c:
        gather_parameter(model, "layers.0.attn.qkv.weight", m)
    assert c.by_kind() == {"all_gather": 1}, c.by_kind()
    with count_collectives() as c:
        gather_parameter(model, "norm.weight", m)
    assert c.count() == 0
    # a tied weight answers to either name
    torch.testing.assert_close(gather_parameter(model, "lm_head.weight", m),
                               gather_parameter(model, "embed.weight", m), **EXACT)
    typo = r"no parameter 'layers\.0\.attn\.qkv\.wieght'; close names: \[.*'layers\.0\.attn\.qkv\.weight'"
    with count_collectives() as c, pytest.raises(KeyError, match=typo):
        gather_parameter(model, "layers.0.attn.qkv.wieght", m)
    assert c.count() == 0  # refused before any collective: no rank waits for the others
    with pytest.raises(ValueError, match="laid out for tp=2; the mesh has tp=1"):
        of(model.embed.weight, mesh(1, 2))  # the same ranks as one DP group of tp=1 each


def test_gather_parameter_collectives_and_unknown_names():
    _dist.run(2, _check_gather_collectives_and_errors)


def _check_blocks_full():
    """A DTensor of blocks made by hand: each rank's local tensor is its slice of every
    block; full() puts the blocks back in order."""
    rank, n = world()
    m = mesh(n)
    full = torch.arange(16 * 3, dtype=torch.float64).view(16, 3)
    blocks = ((8, n), (4, 1), (4, min(2, n)))
    layout = Layout(Shard(0), full.shape, n, blocks)
    view = DTensor(layout.shard(full, rank), m, Shard(0), full.shape, blocks)
    torch.testing.assert_close(view.full(), full, **EXACT)
    if n > 1:  # an even chunk is not this rank's slice of every block (replicated ones are wider)
        with pytest.raises(ValueError, match="does not match global shape"):
            DTensor(full.chunk(n)[rank], m, Shard(0), full.shape, blocks)


@pytest.mark.parametrize("n", [1, 2, 4])
def test_full_of_blocks(n):
    _dist.run(n, _check_blocks_full)


def test_layout_validation():
    with pytest.raises(ValueError, match=r"blocks \(\(8, 2\), \(4, 2\)\) add up to 12, not to dim 0"):
        Layout(Shard(0), (16, 3), 2, ((8, 2), (4, 2)))
    with pytest.raises(ValueError, match=r"need a Shard placement, not Replicate\(\)"):
        Layout(Replicate(), (16,), 2, ((16, 2),))
    with pytest.raises(ValueError, match="size of dim 1=5 is not divisible by tp=2"):
        Layout(Shard(-1), (4, 5), 2)
    assert Layout(Shard(-1), (4, 6), 2).placement == Shard(1)
    assert dtensor.of is of
