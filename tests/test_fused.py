"""raytp.nn.fused: RoPE and SwiGLU compiled into one kernel each way equal the eager ops
(float32, forward and input gradients, rtol 1e-5 / atol 1e-6); elsewhere the eager function
runs; a compilation that fails falls back to eager with one warning."""

import logging

import pytest
import torch
import torch.nn.functional as F

from raytp.nn import fused
from raytp.nn.mlp import _fused_swiglu, swiglu
from raytp.nn.rotary import _fused_rope_qk, _rope, apply_rope_qk, rope_tables

TOL = {"rtol": 1e-5, "atol": 1e-6}


@pytest.fixture
def fuse_on_cpu(monkeypatch):
    monkeypatch.setattr(fused.Fused, "devices", frozenset({"cpu"}))
    for f in (_fused_rope_qk, _fused_swiglu):
        monkeypatch.setattr(f, "failed", False)


def _grads(fn, *inputs):
    inputs = [x.detach().clone().requires_grad_() for x in inputs]
    outs = fn(*inputs)
    outs = outs if isinstance(outs, tuple) else (outs,)
    torch.autograd.backward(outs, [torch.ones_like(o) * (i + 1) for i, o in enumerate(outs)])
    return [o.detach() for o in outs], [x.grad for x in inputs]


def test_fused_rope_and_swiglu_equal_eager(fuse_on_cpu):
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 8, 4, 16, generator=g), torch.randn(2, 8, 2, 16, generator=g)
    cos, sin = rope_tables(16, 8)
    eager = lambda q, k: (_rope(q, cos[:, None], sin[:, None]), _rope(k, cos[:, None], sin[:, None]))
    out, grads = _grads(lambda q, k: apply_rope_qk(q, k, cos, sin), q, k)
    ref, ref_grads = _grads(eager, q, k)
    assert _fused_rope_qk.compiled is not None and not _fused_rope_qk.failed  # the compiled path ran
    for a, b in zip(out + grads, ref + ref_grads, strict=True):
        torch.testing.assert_close(a, b, **TOL)
    h = torch.randn(3, 5, 24, generator=g)
    (out, grads), (ref, ref_grads) = _grads(_fused_swiglu, h), _grads(swiglu, h)
    torch.testing.assert_close(out[0], ref[0], **TOL)
    torch.testing.assert_close(grads[0], ref_grads[0], **TOL)
    gate, up = h.chunk(2, -1)
    torch.testing.assert_close(out[0], F.silu(gate) * up, **TOL)


def test_eager_where_fusing_does_not_pay(monkeypatch):
    calls = []
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: calls.append(fn) or fn)
    f = fused.Fused(swiglu)
    h = torch.randn(2, 8)
    f(h)  # CPU: not in Fused.devices
    monkeypatch.setattr(fused.Fused, "devices", frozenset({"cpu"}))
    with torch.no_grad():
        f(h)  # inference: no autograd to save for
    assert calls == [] and f.compiled is None
    f(h)
    assert calls == [swiglu]


def test_failed_compile_falls_back_with_one_warning(monkeypatch, caplog):
    monkeypatch.setattr(fused.Fused, "devices", frozenset({"cpu"}))

    def broken(fn, **kw):
        def run(*args):
            raise RuntimeError("no triton here\nmore lines")
        return run

    monkeypatch.setattr(torch, "compile", broken)
    f = fused.Fused(swiglu)
    h = torch.randn(2, 8)
    with caplog.at_level(logging.WARNING, logger="raytp.nn.fused"):
        torch.testing.assert_close(f(h), swiglu(h))
        torch.testing.assert_close(f(h), swiglu(h))
    assert f.failed
    assert [r.getMessage() for r in caplog.records] == [
        "raytp: swiglu runs eager: torch.compile failed: no triton here"]
