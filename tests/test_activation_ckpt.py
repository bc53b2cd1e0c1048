"""Activation checkpointing: gradients with full and selective recomputation equal those
without (float64, tp=2, dropout on: the TP RNG regions are replayed); without replaying
them they differ; the recompute really runs (its collectives are issued in the backward);
plain modules by pattern; bad modes and patterns refused with their names."""

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from raytp import activation_ckpt
from raytp.comm import count_collectives
from raytp.engine import BuildSpec, build_engine
from raytp.models import GPTConfig
from raytp.models.bert import BertConfig

import _dist
from helpers import mesh

SMALL = {"vocab_size": 37, "n_layers": 2, "d_model": 32, "d_ff": 48, "max_seq_len": 16, "dtype": "float64"}
CONFIGS = {"gpt2": GPTConfig(**SMALL, n_heads=4, dropout=0.2),
           "gpt2-sp": GPTConfig(**SMALL, n_heads=4, dropout=0.2, sequence_parallel=True),
           "llama-gqa": GPTConfig(**SMALL, norm="rmsnorm", activation="swiglu", positions="rope", bias=False,
                                  n_heads=8, n_kv_heads=2, dropout=0.2)}
EXACT = {"rtol": 1e-12, "atol": 1e-14}


def _batch():
    return {"input_ids": torch.randint(0, 37, (4, 8), generator=torch.Generator().manual_seed(3))}


class _CountGemms(TorchDispatchMode):
    """How many GEMMs run inside the block (the backward's own and any recomputed)."""

    def __init__(self):
        super().__init__()
        self.gemms = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.gemms += func in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default,
                               torch.ops.aten.bmm.default)
        return func(*args, **(kwargs or {}))


def _grads(spec, batch, replay=True, built=None):
    """Loss, local gradients, and the backward's collective and GEMM counts of one step of
    ``spec`` at tp=2."""
    if not replay:  # the recompute draws from where the TP RNG regions got to: other masks
        activation_ckpt._replay, kept = _no_replay, activation_ckpt._replay
    try:
        engine = build_engine(mesh(2), spec)
        if built is not None:
            built.append(engine)
        engine.forward(batch)
        with count_collectives() as counter, _CountGemms() as gemms:
            engine.backward()
    finally:
        if not replay:
            activation_ckpt._replay = kept
    grads = {n: p.grad.detach().clone() for n, p in engine.model.named_parameters()}
    return engine._loss.item(), grads, counter.count("all_reduce") + counter.count("all_gather"), gemms.gemms


def _no_replay(tracker, snapshot):
    from contextlib import nullcontext

    return nullcontext()


def _compare_modes(config):
    batch = _batch()
    base = _grads(BuildSpec(model=config), batch)
    out = {mode: _grads(BuildSpec(model=config, activation_checkpointing=mode), batch)
           for mode in ("full", "selective")}
    no_dropout = _grads(BuildSpec(model=GPTConfig(**{**vars(config), "dropout": 0.0})), batch)
    unreplayed = _grads(BuildSpec(model=config, activation_checkpointing="full"), batch, replay=False)
    return base, out, no_dropout, unreplayed


def _assert_grads(a, b):
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], msg=lambda m, n=name: f"{n}: {m}", **EXACT)


@pytest.mark.parametrize("name", CONFIGS)
def test_checkpointed_gradients_equal_plain_ones(name):
    for base, out, no_dropout, unreplayed in _dist.run(2, _compare_modes, CONFIGS[name]):
        assert base[0] != no_dropout[0]  # dropout is on
        for mode, (loss, grads, collectives, gemms) in out.items():
            assert loss == base[0], mode
            _assert_grads(grads, base[1])
            if mode == "full":  # the blocks' forward (collectives, GEMMs) runs again in the backward
                assert collectives > base[2] and gemms > base[3], (collectives, gemms, base[2:])
            else:  # the GEMM outputs are kept
                assert gemms == base[3], (gemms, base[3])
        assert unreplayed[0] == base[0]
        with pytest.raises(AssertionError):
            _assert_grads(unreplayed[1], base[1])


class _Blocks(nn.Module):
    """Plain MLP blocks with (torch-RNG) dropout, tensor-parallel by a plan."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 16),
                                                  nn.Dropout(0.3)) for _ in range(2))
        self.head = nn.Linear(16, 5)

    def forward(self, x):
        for block in self.blocks:
            x = x + block(x)
        return self.head(x)


def _make_blocks():
    return _Blocks().double()


PLAN = {"blocks.*.0": "colwise", "blocks.*.2": "rowwise"}


def _plain(mode):
    torch.manual_seed(11)  # the dropout masks of nn.Dropout come from torch's generator
    x = torch.randn(6, 16, dtype=torch.float64)
    y = torch.randint(0, 5, (6,))
    return _grads(BuildSpec(model=_make_blocks, plan=PLAN, activation_checkpointing=mode), {"x": x, "y": y})


def _plain_modes():
    return {str(mode): _plain(mode) for mode in (None, {"blocks.*": "full"}, {"blocks.1": "selective"})}


def test_plain_module_by_pattern():
    for out in _dist.run(2, _plain_modes):
        base = out["None"]
        for mode, (loss, grads, *_) in out.items():
            assert loss == base[0], mode
            _assert_grads(grads, base[1])
        assert out[str({"blocks.*": "full"})][2] > base[2]


def _bert_loss(model, batch):
    return model(batch["input_ids"]).pow(2).mean()


def _bert_modes():
    config = BertConfig(vocab_size=37, n_layers=2, n_heads=4, d_model=32, max_seq_len=16, dtype="float64",
                        dropout=0.2)
    return [_grads(BuildSpec(model=config, loss_fn=_bert_loss, activation_checkpointing=mode), _batch())
            for mode in (None, "full", "selective")]


def test_bert_layers_checkpointed():
    for base, *out in _dist.run(2, _bert_modes):
        for loss, grads, *_ in out:
            assert loss == base[0]
            _assert_grads(grads, base[1])
        assert out[0][2] > base[2]


def test_wrapped_forward_keeps_names_and_no_grad_path():
    module = _make_blocks()
    names = [n for n, _ in module.named_parameters()]
    chosen = activation_ckpt.apply_activation_checkpointing(module, {"blocks.*": "full"})
    assert chosen == {"blocks.0": "full", "blocks.1": "full"}
    assert [n for n, _ in module.named_parameters()] == names
    with torch.no_grad():
        module(torch.randn(2, 16, dtype=torch.float64))


@pytest.mark.parametrize("bad", ["half", {"blocks.*": "some"}, {}, 3])
def test_bad_mode_refused_by_buildspec(bad):
    with pytest.raises(ValueError, match="activation_checkpointing"):
        BuildSpec(model=_make_blocks, activation_checkpointing=bad)


def test_pattern_matching_nothing_is_named():
    with pytest.raises(ValueError, match=r"'blokcs\.\*' matches no submodule.*blocks"):
        activation_ckpt.choose(_make_blocks(), {"blokcs.*": "full"})
    with pytest.raises(ValueError, match="has none: pass a dict"):
        activation_ckpt.choose(_make_blocks(), "full")
    with pytest.raises(ValueError, match="is inside 'blocks.0'"):
        activation_ckpt.choose(_make_blocks(), {"blocks.0": "full", "blocks.0.0": "full"})


def _compiled_modes(config):
    """Eager without checkpointing, then compiled blocks (aot_eager: eager's dropout numbers)
    checkpointed in full, and compiled without checkpointing (the recompute's collectives
    are the difference)."""
    from raytp.compile import CompileOptions, is_compiled

    torch._dynamo.reset()
    batch, aot = _batch(), CompileOptions(backend="aot_eager")
    base = _grads(BuildSpec(model=config), batch)
    out, built = {}, []
    for mode in ("full", None):
        out[mode] = _grads(BuildSpec(model=config, compile=aot, activation_checkpointing=mode), batch,
                           built=built)
    return base, out, all(is_compiled(block) for engine in built for block in engine.model.layers)


def test_compiled_checkpointed_blocks_give_eager_gradients():
    """Checkpoint around compiled blocks (float64, tp=2, dropout 0.2): the loss and the
    gradients equal eager's without checkpointing (rtol 1e-12, atol 1e-14); the full
    recompute issues the blocks' collectives again, counted."""
    for base, out, compiled in _dist.run(2, _compiled_modes, CONFIGS["gpt2"]):
        assert compiled
        for mode, (loss, grads, *_) in out.items():
            assert loss == pytest.approx(base[0], rel=1e-12), mode
            _assert_grads(grads, base[1])
        assert out["full"][2] > out[None][2] == base[2]


def test_selective_checkpointing_of_compiled_blocks_refused():
    with pytest.raises(ValueError, match=r"^activation_checkpointing='selective' with compile=True: only "
                                         r"'full' checkpoints a compiled block"):
        BuildSpec(model=CONFIGS["gpt2"], compile=True, activation_checkpointing="selective")
    BuildSpec(model=CONFIGS["gpt2"], compile=True, activation_checkpointing="full")
