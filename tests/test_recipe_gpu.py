"""The training recipe on one GPU (`pytest -m gpu tests/test_recipe_gpu.py`): bf16 mixed
precision tracks the fp32 run (pure bf16 does not), full activation checkpointing lowers
the peak activation memory, compiled blocks (inductor) match eager within bf16 tolerance,
and full checkpointing around compiled blocks trains. No network, no transformers."""

import pytest
import torch

import raytp
from raytp.engine import BuildSpec, build_engine
from raytp.models import GPTConfig

import _dist
from helpers import mesh

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")]

SMALL = {"vocab_size": 512, "n_layers": 2, "n_heads": 4, "d_model": 128, "d_ff": 512, "max_seq_len": 64,
         "norm": "rmsnorm", "activation": "swiglu", "positions": "rope", "bias": False,
         "tie_embeddings": False}


def _ids(step, batch=8, seq=64, vocab=512):
    g = torch.Generator().manual_seed(step % 2)  # two batches in turn: the loss falls fast
    return {"input_ids": torch.randint(0, vocab, (batch, seq), generator=g)}


def _losses(spec, steps):
    engine = build_engine(mesh(1), spec)
    return [engine.train_step(_ids(step))["loss"] for step in range(steps)]


def _precisions():
    adam = raytp.AdamW(lr=1e-3, weight_decay=0.0)
    fp32 = _losses(BuildSpec(GPTConfig(**SMALL, dtype="float32"), optimizer=adam), 50)
    mixed = _losses(BuildSpec(GPTConfig(**SMALL, dtype="float32"), optimizer=adam,
                              precision=raytp.MixedPrecision()), 50)
    bf16 = _losses(BuildSpec(GPTConfig(**SMALL, dtype="bfloat16"), optimizer=adam), 50)
    return fp32, mixed, bf16


def test_mixed_precision_tracks_fp32_and_pure_bf16_does_not():
    fp32, mixed, bf16 = _dist.run(1, _precisions, backend="nccl")[0]
    off = {name: max(abs(a - b) / b for a, b in zip(run, fp32, strict=True))
           for name, run in (("mixed", mixed), ("bf16", bf16))}
    assert fp32[-1] < 0.8 * fp32[0], fp32  # it learns
    assert off["mixed"] < 5e-2, off  # bf16 rounding of the forward and backward only
    assert off["mixed"] < off["bf16"], off


def _activation_bytes(checkpointing):
    config = GPTConfig(**{**SMALL, "n_layers": 8, "d_model": 512, "d_ff": 2048, "n_heads": 8,
                          "max_seq_len": 512}, dtype="bfloat16")
    engine = build_engine(mesh(1), BuildSpec(config, optimizer=raytp.AdamW(lr=1e-4),
                                             activation_checkpointing=checkpointing))
    batch = _ids(0, batch=8, seq=512)
    engine.train_step(batch)  # the optimizer state is made
    peak = max(engine.train_step(batch)["peak_mem_bytes"] for _ in range(2))
    held = engine.memory_bytes()["allocated_bytes"]
    return peak - held


def test_full_checkpointing_lowers_peak_activation_memory():
    none, full = (_dist.run(1, _activation_bytes, mode, backend="nccl")[0] for mode in (None, "full"))
    assert full < none / 2, (full, none)


def _compiled(compile, checkpointing=None, dropout=0.0):
    torch._dynamo.reset()
    spec = BuildSpec(GPTConfig(**SMALL, dtype="bfloat16", dropout=dropout), optimizer=raytp.SGD(lr=0.1),
                     compile=compile, activation_checkpointing=checkpointing)
    return _losses(spec, 4)


def test_compiled_blocks_match_eager_within_bf16():
    eager = _dist.run(1, _compiled, False, backend="nccl")[0]
    compiled = _dist.run(1, _compiled, True, backend="nccl")[0]
    assert compiled == pytest.approx(eager, rel=2e-2)  # bf16: inductor fuses and orders sums otherwise


def test_full_checkpointing_around_compiled_blocks_trains():
    compiled = _dist.run(1, _compiled, True, backend="nccl")[0]
    both = _dist.run(1, _compiled, True, "full", backend="nccl")[0]
    assert both == pytest.approx(compiled, rel=2e-2)
    with_dropout = _dist.run(1, _compiled, True, "full", 0.1, backend="nccl")[0]
    assert all(torch.isfinite(torch.tensor(with_dropout))) and with_dropout[-1] < with_dropout[0]


def _dropout_grads(checkpointing):
    """fp32 model, dropout 0.1, inductor: the loss and the gradients of one step."""
    torch._dynamo.reset()
    spec = BuildSpec(GPTConfig(**SMALL, dtype="float32", dropout=0.1), optimizer=raytp.SGD(lr=0.1),
                     compile=True, activation_checkpointing=checkpointing, seed=0)
    engine = build_engine(mesh(1), spec)
    torch.manual_seed(5)  # the same generator states for both builds' dropout masks
    engine.forward(_ids(0))
    engine.backward()
    grads = torch.cat([p.grad.reshape(-1).cpu() for p in engine.model.parameters() if p.grad is not None])
    return engine._loss.item(), grads


def test_checkpointing_around_compiled_blocks_replays_inductors_dropout():
    """The recompute (the block's compiled graph with grad) draws the masks the forward
    (its graph without) drew: the gradients equal compile alone's (fp32, rtol 1e-4)."""
    (loss, grads), (ref_loss, ref_grads) = (_dist.run(1, _dropout_grads, mode, backend="nccl")[0]
                                            for mode in ("full", None))
    assert loss == pytest.approx(ref_loss, rel=1e-5)
    torch.testing.assert_close(grads, ref_grads, rtol=1e-4, atol=1e-6)
