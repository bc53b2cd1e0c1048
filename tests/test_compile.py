"""``build(..., compile=...)``: blocks compiled in place with ``torch.compile`` train as in
eager mode (float32, rtol 1e-5 / atol 1e-5: the compiled graphs decompose ops and order sums
differently), issue the same collectives, counted and tagged the same; patterns pick the
parts of a plain module; a part that cannot compile falls back to eager with one log line."""

import logging

import pytest
import torch
from torch import nn
from torch._dynamo.utils import counters

import raytp
from raytp.comm import count_collectives
from raytp.compile import CompileOptions, compile_blocks, compile_options, is_compiled
from raytp.engine import BuildSpec, build_engine
from raytp.models import BertConfig, GPTConfig
from raytp.nn.kernels import AsyncInputGrad, kernel_layers

import _dist
from helpers import mesh, world
from nets import PLAN, Net, make_batches

F32 = {"rtol": 1e-5, "atol": 1e-5}
SMALL = {"vocab_size": 37, "n_layers": 2, "d_model": 32, "d_ff": 48, "max_seq_len": 16, "dtype": "float32"}
LLAMA = {"norm": "rmsnorm", "activation": "swiglu", "positions": "rope", "bias": False,
         "tie_embeddings": False, "n_heads": 4, "n_kv_heads": 2}
# more blocks than Dynamo's recompile_limit (8): all of them share the compiled code
CONFIGS = {"gpt2": GPTConfig(**SMALL, n_heads=4), "llama": GPTConfig(**{**SMALL, "n_layers": 10}, **LLAMA),
           "gpt2-sp": GPTConfig(**SMALL, n_heads=4, sequence_parallel=True),
           "gpt2-inductor": GPTConfig(**{**SMALL, "n_layers": 1}, n_heads=4)}
OVERLAP = {"gpt2": True}  # the overlapped kernels' autograd functions are graph breaks too
AOT = CompileOptions(backend="aot_eager")  # the compiled graphs, without inductor's C++ build


def _batch(step):
    return {"input_ids": torch.randint(0, 37, (2, 8), generator=torch.Generator().manual_seed(step))}


def _two_steps(engine, batches):
    """Step 1, then step 2's forward and backward: the losses, the collectives of each
    step (kinds and the tags naming their layers), the gradients before step 2's update,
    and the parameters after it."""
    losses, collectives = [], []
    for i, batch in enumerate(batches):
        with count_collectives() as counter:
            if i == 0:
                losses.append(engine.train_step(batch)["loss"])
                continue
            engine.forward(batch)
            engine.backward()
            grads = {n: p.grad.clone() for n, p in engine.model.named_parameters()}
            losses.append(engine.step()["loss"])
        collectives.append([(r.kind, r.group, r.tag) for r in counter.records])
    params = {n: p.detach().clone() for n, p in engine.model.named_parameters()}
    return losses, collectives, grads, params


def _compiled_vs_eager(config, options, overlap):
    rank, n = world()
    results = []
    torch._dynamo.reset()
    counters.clear()
    for compile in (False, options):
        # SGD, not AdamW: Adam scales the rounding noise of gradients that are 0 in exact math
        # (the key bias's) up to lr, and inductor's rounding is not eager's
        spec = BuildSpec(config, optimizer=raytp.SGD(lr=0.1, momentum=0.9), seed=0, max_grad_norm=1.0,
                         overlap=overlap, compile=compile)
        engine = build_engine(mesh(n), spec)
        results.append((_two_steps(engine, [_batch(0), _batch(1)]), list(engine.model.state_dict())))
    # still compiled (no fallback), and graphs were made: the compute between the collectives
    assert all(b._compiled_call_impl is not None for b in engine.model.layers)
    assert counters["stats"]["unique_graphs"] >= 3, dict(counters["stats"])
    # every frame compiled: none left eager past Dynamo's recompile_limit (one compile per block)
    assert counters["frames"]["ok"] == counters["frames"]["total"], dict(counters["unimplemented"])
    if overlap:
        assert any(isinstance(layer.kernel, AsyncInputGrad) for layer in kernel_layers(engine.model))
    (eager, eager_keys), (compiled, compiled_keys) = results
    assert compiled_keys == eager_keys  # in place: no "_orig_mod." prefix
    torch.testing.assert_close(compiled[0], eager[0], **F32)  # losses
    assert compiled[1] == eager[1]  # the same collectives, in the same order, with the same tags
    for i in (2, 3):  # gradients of step 2, parameters after it
        torch.testing.assert_close(compiled[i], eager[i], **F32)
    return compiled[1]


@pytest.mark.parametrize("name", CONFIGS)
def test_compiled_gpt_trains_as_eager_with_the_same_collectives(name):
    config = CONFIGS[name]
    options = CompileOptions() if name.endswith("inductor") else AOT  # inductor: C++ kernels on CPU
    for collectives in _dist.run(2, _compiled_vs_eager, config, options, OVERLAP.get(name)):
        kinds = [kind for kind, _, _ in collectives[0]]
        per_block = "reduce_scatter" if config.sequence_parallel else "all_reduce"
        assert kinds.count(per_block) >= 4 * config.n_layers
        last = f"layers.{config.n_layers - 1}.mlp"  # tags name the layers inside the compiled blocks
        assert any(tag and tag.startswith(last) for _, _, tag in collectives[0])


def _bert_compiled_vs_eager():
    rank, n = world()
    config = BertConfig(vocab_size=40, n_layers=2, n_heads=4, d_model=32, max_seq_len=16)
    ids = torch.randint(0, 40, (2, 8), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[1, 5:] = 0
    results = []
    for compile in (False, AOT):
        torch.manual_seed(0)
        model = config.build(mesh(n))
        assert list(compile_blocks(model, compile)) == ([] if not compile else ["layers.0", "layers.1"])
        with count_collectives() as counter:
            hidden = model(ids, mask)
            (hidden * torch.linspace(-1, 1, 32)).sum().backward()
        results.append((hidden.detach(), {k: p.grad for k, p in model.named_parameters()}, counter.by_kind()))
    torch.testing.assert_close(results[1][:2], results[0][:2], **F32)
    assert results[1][2] == results[0][2] and results[0][2]


def test_compiled_bert_blocks_match_eager():
    _dist.run(2, _bert_compiled_vs_eager)


def test_an_option_it_does_not_take_is_a_value_error():
    for bad in ("yes", 1, {"layers.*": False}, (), ("",)):
        with pytest.raises(ValueError, match="compile"):
            BuildSpec(GPTConfig(**SMALL, n_heads=4), compile=bad)
    with pytest.raises(ValueError, match="fullgraph"):
        CompileOptions(fullgraph="no")
    assert compile_options(False) is None and compile_options(None) is None
    assert compile_options({"a.*": True}) == CompileOptions(parts=("a.*",))


def _plain(compile):
    """Net parallelized at tp=2, eager and with ``compile``: the same losses, parameters and
    collectives over 2 steps; returns the names of the compiled parts."""
    rank, n = world()
    results, compiled = [], None
    for value in (False, compile):
        engine = build_engine(mesh(n), BuildSpec(Net, plan=PLAN, optimizer=raytp.SGD(lr=0.1), compile=value))
        losses, collectives = [], []
        for batch in make_batches(2):
            with count_collectives() as counter:
                losses.append(engine.train_step(batch)["loss"])
            collectives.append([(r.kind, r.tag) for r in counter.records])
        results.append((losses, collectives, {k: v.clone() for k, v in engine.model.state_dict().items()}))
        compiled = sorted(name for name, m in engine.model.named_modules() if m._compiled_call_impl)
    (losses, collectives, state), (ref_losses, ref_collectives, ref_state) = results[1], results[0]
    assert collectives == ref_collectives and collectives[0]  # the same collectives, tags included
    torch.testing.assert_close((losses, state), (ref_losses, ref_state), rtol=1e-12, atol=1e-12)  # float64
    return compiled


@pytest.mark.parametrize(("compile", "parts"), [
    (AOT, [""]),  # no blocks: the whole module
    (CompileOptions(backend="aot_eager", parts=("fc_*",)), ["fc_in", "fc_out"]),
    (("fc_out",), ["fc_out"]),  # inductor (C++ on CPU) on one small layer
])
def test_a_plain_module_compiles_whole_or_the_parts_patterns_name(compile, parts):
    for compiled in _dist.run(2, _plain, compile):
        assert compiled == parts


class Tiny(nn.Module):  # torch.compile skips the frames of torch.nn's own modules: a module of ours
    def __init__(self):
        super().__init__()
        self.fc_in, self.fc_out = nn.Linear(4, 8), nn.Linear(8, 4)

    def forward(self, x):
        return self.fc_out(torch.tanh(self.fc_in(x)))


def _seq():
    torch.manual_seed(0)
    return nn.Sequential(Tiny(), nn.Tanh(), Tiny())


def test_a_pattern_that_matches_nothing_names_itself_and_some_modules():
    names = r"\['0', '0.fc_in', '0.fc_out', '1'"
    with pytest.raises(ValueError, match=r"'blocks\.\*' matches no submodule.*" + names):
        compile_blocks(_seq(), ("0", "blocks.*"))


def _failing_backend(gm, example_inputs):
    raise RuntimeError("no backend today")


def test_a_part_that_fails_to_compile_runs_eager_and_logs_one_line(caplog):
    model, ref, x = _seq(), _seq(), torch.randn(5, 4)
    assert compile_blocks(model, CompileOptions(backend=_failing_backend, parts=("2",))).keys() == {"2"}
    with caplog.at_level(logging.WARNING, logger="raytp.compile"):
        for _ in range(2):
            torch.testing.assert_close(model(x), ref(x), rtol=0, atol=0)
    lines = [r for r in caplog.records if r.name == "raytp.compile"]
    assert len(lines) == 1 and "no backend today" in lines[0].getMessage(), [r.getMessage() for r in lines]
    assert "2" in lines[0].getMessage() and not is_compiled(model[2])


def test_a_compile_call_that_raises_leaves_the_part_eager(caplog, monkeypatch):
    def refuse(self, **kwargs):
        raise RuntimeError(f"cannot compile {type(self).__name__}")

    monkeypatch.setattr(nn.Module, "compile", refuse)
    model, ref, x = _seq(), _seq(), torch.randn(5, 4)
    with caplog.at_level(logging.WARNING, logger="raytp.compile"):
        compile_blocks(model, ("0", "2"))
        torch.testing.assert_close(model(x), ref(x), rtol=0, atol=0)
    lines = [r.getMessage() for r in caplog.records if r.name == "raytp.compile"]
    assert [line.count("cannot compile Tiny") for line in lines] == [1, 1], lines  # one per part


def test_an_error_of_the_forward_itself_is_raised_not_a_fallback(caplog):
    model = _seq()
    compile_blocks(model, CompileOptions(backend="aot_eager"))
    with caplog.at_level(logging.WARNING, logger="raytp.compile"), \
            pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
        model(torch.randn(5, 7))
    assert not [r for r in caplog.records if r.name == "raytp.compile"]
    assert model._compiled_call_impl is not None  # still compiled: the next good input runs it
    x = torch.randn(5, 4)
    torch.testing.assert_close(model(x), _seq()(x), **F32)
