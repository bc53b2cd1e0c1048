"""Every layer initializes itself, full tensor then slice: built on the meta device,
materialized (its memory filled with NaN) and reset with ``reset_parameters_``, each rank
at tp=2 holds exactly its slice of the layer built at tp=1 with the same seed, and the
same layer built straight on the CPU holds the same values. The layers are found by
walking the modules of raytp.nn and raytp.models, so a new one without a recipe here,
without ``reset_parameters``, leaving a parameter unset, or drawing its own shard instead
of slicing the full tensor fails."""

import importlib
import pkgutil
import sys

import pytest
import torch
from torch import nn

import raytp.models
import raytp.nn
from raytp import Replicate, Shard
from raytp.models import GPT, Bert, BertConfig, GPTConfig
from raytp.models.bert import EncoderLayer, TokenTypeEmbedding
from raytp.models.gpt import Block
from raytp.nn import (
    ColumnParallelLinear,
    LayerNorm,
    ParallelAttention,
    ParallelLMHead,
    ParallelMLP,
    PositionEmbedding,
    QKVParallelLinear,
    RMSNorm,
    RowParallelLinear,
    VocabParallelEmbedding,
)
from raytp.params import materialize_, reset_parameters_
from raytp.random import RNGTracker

import _dist
from helpers import expected_local, mesh, world

F64 = torch.float64
GPT_SMALL = {"vocab_size": 37, "n_layers": 2, "d_model": 16, "d_ff": 24, "max_seq_len": 8, "n_heads": 4,
             "dtype": "float64"}
CONFIGS = {
    "gpt2": GPTConfig(**GPT_SMALL),
    "llama": GPTConfig(**GPT_SMALL, n_kv_heads=1, norm="rmsnorm", activation="swiglu", positions="rope",
                       bias=False, tie_embeddings=False, init_std=0.05),  # at tp=2: K/V replicated
    "bert": BertConfig(vocab_size=37, n_layers=2, n_heads=4, d_model=16, d_ff=24, max_seq_len=8,
                       dtype="float64"),
}


def _layer_classes(modules) -> list[type]:
    """Every public ``nn.Module`` subclass defined in ``modules``."""
    return [obj for module in modules for name, obj in vars(module).items()
            if isinstance(obj, type) and issubclass(obj, nn.Module)
            and obj.__module__ == module.__name__ and not name.startswith("_")]


def _package_modules(*packages):
    return [importlib.import_module(f"{package.__name__}.{info.name}")
            for package in packages for info in pkgutil.iter_modules(package.__path__)]


DISCOVERED = _layer_classes(_package_modules(raytp.nn, raytp.models))


def _tied_head(m, device):
    embed = VocabParallelEmbedding(37, 8, mesh=m, init_std=0.1, device=device, dtype=F64)
    return nn.ModuleDict({"embed": embed, "head": ParallelLMHead(8, 37, mesh=m, tied_to=embed,
                                                                 init_std=0.5, device=device, dtype=F64)})


# class -> {variant: build(mesh, device)}; every layer of raytp.nn and raytp.models needs one
RECIPES = {
    ColumnParallelLinear: {
        "default": lambda m, d: ColumnParallelLinear(8, 12, mesh=m, device=d, dtype=F64),
        "normal-no-bias": lambda m, d: ColumnParallelLinear(8, 12, mesh=m, bias=False, init_std=0.1,
                                                            device=d, dtype=F64),
        "blocks": lambda m, d: ColumnParallelLinear(8, 12, mesh=m, blocks=(4, 8), init_std=0.1, device=d,
                                                    dtype=F64),
        "replicated": lambda m, d: ColumnParallelLinear(8, 12, mesh=m, weight_placement=Replicate(),
                                                        bias_placement=Replicate(), device=d, dtype=F64),
    },
    RowParallelLinear: {
        "default": lambda m, d: RowParallelLinear(8, 12, mesh=m, device=d, dtype=F64),
        "normal": lambda m, d: RowParallelLinear(8, 12, mesh=m, init_std=0.1, device=d, dtype=F64),
        "placements": lambda m, d: RowParallelLinear(8, 12, mesh=m, weight_placement=Replicate(),
                                                     bias_placement=Shard(0), device=d, dtype=F64),
    },
    QKVParallelLinear: {
        "mha": lambda m, d: QKVParallelLinear(16, 4, mesh=m, device=d, dtype=F64),
        "gqa-replicated-kv": lambda m, d: QKVParallelLinear(16, 4, 1, mesh=m, init_std=0.1, device=d,
                                                            dtype=F64),
    },
    VocabParallelEmbedding: {
        "default-padded": lambda m, d: VocabParallelEmbedding(37, 8, mesh=m, device=d, dtype=F64),
        "padding-idx": lambda m, d: VocabParallelEmbedding(37, 8, mesh=m, padding_idx=20, init_std=0.1,
                                                           device=d, dtype=F64),
    },
    PositionEmbedding: {
        "default": lambda m, d: PositionEmbedding(8, 6, mesh=m, device=d, dtype=F64),
        "sp-normal": lambda m, d: PositionEmbedding(8, 6, mesh=m, sequence_parallel=True, init_std=0.1,
                                                    device=d, dtype=F64),
    },
    ParallelLMHead: {
        "default": lambda m, d: ParallelLMHead(8, 37, mesh=m, device=d, dtype=F64),
        "normal": lambda m, d: ParallelLMHead(8, 37, mesh=m, init_std=0.1, device=d, dtype=F64),
        "tied": _tied_head,
    },
    LayerNorm: {
        "bias": lambda m, d: LayerNorm(8, mesh=m, device=d, dtype=F64),
        "no-bias": lambda m, d: LayerNorm(8, mesh=m, bias=False, device=d, dtype=F64),
    },
    RMSNorm: {"default": lambda m, d: RMSNorm(8, mesh=m, device=d, dtype=F64)},
    ParallelAttention: {
        "default": lambda m, d: ParallelAttention(16, 4, mesh=m, device=d, dtype=F64),
        "gqa-scaled-out": lambda m, d: ParallelAttention(16, 4, 2, mesh=m, bias=False, init_std=0.1,
                                                         out_init_std=0.01, device=d, dtype=F64),
    },
    ParallelMLP: {
        "gelu": lambda m, d: ParallelMLP(8, 12, mesh=m, init_std=0.1, device=d, dtype=F64),
        "swiglu-scaled-out": lambda m, d: ParallelMLP(8, 12, mesh=m, activation="swiglu", init_std=0.1,
                                                      out_init_std=0.01, device=d, dtype=F64),
    },
    TokenTypeEmbedding: {"default": lambda m, d: TokenTypeEmbedding(2, 8, mesh=m, init_std=0.1, device=d,
                                                                    dtype=F64)},
    Block: {name: (lambda m, d, c=CONFIGS[name]: Block(c, m, RNGTracker(0, m.tp_rank), d))
            for name in ("gpt2", "llama")},
    EncoderLayer: {"bert": lambda m, d: EncoderLayer(CONFIGS["bert"], m, RNGTracker(0, m.tp_rank), d)},
    GPT: {name: (lambda m, d, c=CONFIGS[name]: GPT(c, m, device=d)) for name in ("gpt2", "llama")},
    Bert: {"bert": lambda m, d: Bert(CONFIGS["bert"], m, device=d)},
}


class Forgetful(nn.Module):
    """A layer with a parameter and no ``reset_parameters``."""

    def __init__(self, *, mesh, device=None):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(4, device=device, dtype=F64))


class AddsAScale(RowParallelLinear):
    """Inherits ``reset_parameters``, which does not know its new parameter."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.scale = nn.Parameter(torch.empty(self.out_features, device=self.weight.device, dtype=F64))


class DrawsItsShard(ColumnParallelLinear):
    """Draws its local weight instead of slicing the full one: right only at tp=1."""

    @torch.no_grad()
    def reset_parameters(self):
        self.weight.normal_()
        self.bias.zero_()


BROKEN = {
    Forgetful: {"default": lambda m, d: Forgetful(mesh=m, device=d)},
    AddsAScale: {"default": lambda m, d: AddsAScale(8, 12, mesh=m, device=d, dtype=F64)},
    DrawsItsShard: {"default": lambda m, d: DrawsItsShard(8, 12, mesh=m, device=d, dtype=F64)},
}


def _state(module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in module.named_parameters()}


def _on_meta_then_reset(build, m, seed):
    """Built on the meta device, materialized on the CPU, every parameter NaN, then reset."""
    torch.manual_seed(seed)
    module = build(m, "meta")
    materialize_(module, "cpu")
    with torch.no_grad():
        for p in module.parameters():
            p.fill_(float("nan"))
    reset_parameters_(module)
    return module


def _problems(cls, ref_states=None, seed=0):
    """For each variant of ``cls``: its state at this tp (tp=1: the reference), and what is
    wrong with it: NaN left, different from the layer built on the CPU, or (given the
    tp=1 states) not this rank's slice of the tp=1 layer."""
    rank, n = world()
    m, build_all = mesh(n), {**RECIPES, **BROKEN}[cls]
    states, problems = {}, []
    for variant, build in build_all.items():
        where = f"{cls.__name__}[{variant}] tp={n} rank={rank}"
        try:
            module = _on_meta_then_reset(build, m, seed)
        except ValueError as e:
            problems.append(f"{where}: {e}")
            continue
        torch.manual_seed(seed)
        direct = _state(build(m, "cpu"))
        for name, p in module.named_parameters():
            if not torch.isfinite(p).all():
                problems.append(f"{where}: {name} left uninitialized")
            elif not torch.equal(p, direct[name]):
                problems.append(f"{where}: {name} built on the CPU differs from built on meta and reset")
            elif ref_states is not None and not torch.equal(
                    p, expected_local(p, ref_states[variant][name], m.tp_rank)):
                problems.append(f"{where}: {name} is not this rank's slice of the tp=1 {name}")
        states[variant] = _state(module)
    return states, problems


def _check(cls) -> list[str]:
    """The problems of ``cls`` at tp=1 and at tp=2, against tp=1."""
    [(ref, problems)] = _dist.run(1, _problems, cls)
    for _, rank_problems in _dist.run(2, _problems, cls, ref):
        problems += rank_problems
    return problems


def test_discovery_finds_the_layers_and_each_has_a_recipe():
    missing = [cls.__qualname__ for cls in DISCOVERED if cls not in RECIPES]
    assert not missing, f"add a recipe to RECIPES in {__file__} for {missing}"
    stale = [cls.__qualname__ for cls in RECIPES if cls not in DISCOVERED]
    assert not stale, f"discovery no longer finds {stale}"


@pytest.mark.parametrize("cls", DISCOVERED, ids=lambda cls: cls.__qualname__)
def test_layer_initializes_as_the_tp1_slice(cls):
    assert cls in RECIPES, f"add a recipe to RECIPES in {__file__} for {cls.__qualname__}"
    assert _check(cls) == []


def test_discovery_finds_a_new_layer():
    assert set(_layer_classes([sys.modules[__name__]])) == set(BROKEN)


def test_a_layer_without_reset_parameters_is_caught():
    problems = _check(Forgetful)
    assert problems and all("has no reset_parameters()" in p and "Forgetful" in p for p in problems)


def test_a_parameter_the_inherited_reset_parameters_leaves_is_caught():
    problems = _check(AddsAScale)
    assert problems and all("scale left uninitialized" in p for p in problems)


def test_a_layer_drawing_its_own_shard_is_caught():
    problems = _check(DrawsItsShard)
    assert problems == ["DrawsItsShard[default] tp=2 rank=1: weight is not this rank's slice of the tp=1 "
                        "weight"]
