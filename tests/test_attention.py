"""QKVParallelLinear and ParallelAttention against plain attention on one process:
forward, input gradient, every weight gradient after sync_grads and one AdamW step, at
tp 1, 2 and 4, with n_kv_heads above, equal to and below tp, sequence parallelism on
and off (float64). Plus the KV cache, and the head/tp combinations that cannot split."""

import math

import pytest
import torch
from torch import nn

import raytp
from raytp.comm import count_collectives
from raytp.nn import KVCache, ParallelAttention, QKVParallelLinear, rope_tables

import _dist
from helpers import F64, assert_params_match, chunk, mesh, randn, world

WORLDS = [1, 2, 4]
B, T = 2, 8


def ref_rope(x, positions, theta=10000.0):
    """RoPE written out pair by pair: dim i rotates with dim i + head_dim / 2."""
    half = x.shape[-1] // 2
    freqs = theta ** (-2 * torch.arange(half, dtype=torch.float64) / x.shape[-1])
    angle = positions[:, None].double() * freqs  # (T, half)
    cos, sin = angle.cos()[:, None], angle.sin()[:, None]  # (T, 1, half)
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


class RefAttention(nn.Module):
    """Causal grouped-query attention, all heads on one process, with explicit softmax."""

    def __init__(self, d_model, n_heads, n_kv_heads, bias):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.hd = n_heads, n_kv_heads, d_model // n_heads
        self.qkv = nn.Linear(d_model, (n_heads + 2 * n_kv_heads) * self.hd, bias=bias, dtype=torch.float64)
        self.proj = nn.Linear(n_heads * self.hd, d_model, bias=bias, dtype=torch.float64)

    def forward(self, x, positions=None):
        b, t, _ = x.shape
        sizes = [self.n_heads * self.hd, self.n_kv_heads * self.hd, self.n_kv_heads * self.hd]
        q, k, v = (p.reshape(b, t, -1, self.hd) for p in self.qkv(x).split(sizes, -1))
        if positions is not None:
            q, k = ref_rope(q, positions), ref_rope(k, positions)
        kv_of_head = torch.arange(self.n_heads) // (self.n_heads // self.n_kv_heads)
        k, v = k[:, :, kv_of_head], v[:, :, kv_of_head]  # (b, t, n_heads, hd)
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(self.hd)
        causal = torch.ones(t, t, dtype=torch.bool).tril()
        probs = scores.masked_fill(~causal, float("-inf")).softmax(-1)
        return self.proj(torch.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, t, -1))


def _build(n_heads, n_kv_heads, m, bias=True, sp=False):
    torch.manual_seed(0)
    ref = RefAttention(4 * n_heads, n_heads, n_kv_heads, bias)
    torch.manual_seed(0)  # same seed: the TP layers hold exactly ref's shards
    attn = ParallelAttention(4 * n_heads, n_heads, n_kv_heads, mesh=m, bias=bias, sequence_parallel=sp,
                             dtype=torch.float64)
    assert_params_match(attn, ref, m.tp_rank, rtol=0, atol=0)
    return attn, ref


def _check_attention(n_heads, n_kv_heads, sp, rope, bias):
    rank, n = world()
    m = mesh(n)
    attn, ref = _build(n_heads, n_kv_heads, m, bias, sp)
    d = 4 * n_heads
    x, grad_out = randn(B, T, d, seed=1), randn(B, T, d, seed=2)
    x_ref = x.clone().requires_grad_()
    y_ref = ref(x_ref, torch.arange(T) if rope else None)
    (y_ref * grad_out).sum().backward()
    local = (lambda t: chunk(t, 1)) if sp else (lambda t: t)  # sequence parallel: my chunk of T
    x_tp = local(x).clone().requires_grad_()
    tables = rope_tables(4, T, dtype=torch.float64) if rope else None
    with count_collectives() as fwd:
        y = attn(x_tp, tables)
    torch.testing.assert_close(y, local(y_ref), **F64)
    with count_collectives() as bwd:
        (y * local(grad_out)).sum().backward()
    torch.testing.assert_close(x_tp.grad, local(x_ref.grad), **F64)
    raytp.sync_grads(attn, m)
    assert_params_match(attn, ref, m.tp_rank, grads=True)
    ref_norm = torch.cat([p.grad.flatten() for p in ref.parameters()]).norm()
    torch.testing.assert_close(raytp.grad_norm(attn, m).double(), ref_norm, rtol=1e-6, atol=0)
    # Without RoPE the key bias has a zero gradient (softmax ignores a shift shared by all
    # keys): its rounding noise would drive AdamW's normalized step, so use SGD there.
    spec = raytp.AdamW(lr=0.01) if rope else raytp.SGD(lr=0.1)
    spec.build(attn.parameters()).step()
    spec.build(ref.parameters()).step()
    assert_params_match(attn, ref, m.tp_rank)
    return fwd.by_kind(), bwd.by_kind()


HEADS = [(8, 8), (8, 4), (8, 2), (8, 1)]  # at tp=4: n_kv_heads > tp, == tp, < tp, 1


@pytest.mark.parametrize("n", WORLDS)
@pytest.mark.parametrize("heads", HEADS, ids=lambda h: f"heads{h[0]}_kv{h[1]}")
@pytest.mark.parametrize("sp", [False, True], ids=["tp", "sp"])
def test_attention_matches_one_device(n, heads, sp):
    fwd, bwd = _dist.run(n, _check_attention, *heads, sp, True, True)[0]
    if n == 1:
        assert (fwd, bwd) == ({}, {})
    elif sp:
        assert fwd == bwd == {"all_gather": 1, "reduce_scatter": 1}
    else:
        assert fwd == bwd == {"all_reduce": 1}


@pytest.mark.parametrize("rope,bias", [(False, True), (True, False)])
def test_attention_options(rope, bias):
    _dist.run(4, _check_attention, 8, 2, False, rope, bias)


def _check_qkv_layout(n_heads, n_kv_heads):
    """Rank r holds query heads [r h/tp, (r+1) h/tp) and key/value head r * n_kv // tp
    (or its n_kv / tp heads)."""
    rank, n = world()
    m = mesh(n)
    torch.manual_seed(0)
    full = nn.Linear(8, (n_heads + 2 * n_kv_heads) * 2, dtype=torch.float64)  # head_dim 2
    layer = QKVParallelLinear.from_linear(full, m, n_heads=n_heads, n_kv_heads=n_kv_heads)
    assert layer.head_dim == 2
    x = randn(3, 8, seed=1)
    q, k, v = layer(x)
    q_ref, k_ref, v_ref = (t.unflatten(-1, (-1, 2)) for t in full(x).split(
        [n_heads * 2, n_kv_heads * 2, n_kv_heads * 2], -1))
    heads_per_rank = n_heads // n
    torch.testing.assert_close(q, q_ref[:, rank * heads_per_rank:(rank + 1) * heads_per_rank].flatten(1))
    kv = list(range(rank * n_kv_heads // n, (rank + 1) * n_kv_heads // n)) or [rank * n_kv_heads // n]
    torch.testing.assert_close(k, k_ref[:, kv].flatten(1))
    torch.testing.assert_close(v, v_ref[:, kv].flatten(1))


@pytest.mark.parametrize("heads", HEADS, ids=lambda h: f"heads{h[0]}_kv{h[1]}")
def test_qkv_layout(heads):
    _dist.run(4, _check_qkv_layout, *heads)


def _check_kv_cache(n_heads, n_kv_heads):
    """Prefill, a chunk of two, then one token at a time: the logits of a full forward."""
    rank, n = world()
    attn, _ = _build(n_heads, n_kv_heads, mesh(n))
    attn.eval()
    length = 7
    x = randn(B, length, 4 * n_heads, seed=3)
    cos, sin = rope_tables(4, length, dtype=torch.float64)
    full = attn(x, (cos, sin))
    cache = KVCache(length)
    steps = [(0, 3), (3, 5), (5, 6), (6, 7)]
    parts = [attn(x[:, a:b], (cos[a:b], sin[a:b]), cache) for a, b in steps]
    torch.testing.assert_close(torch.cat(parts, 1), full, **F64)
    assert cache.length == length
    with pytest.raises(ValueError, match="the KV cache holds 7 positions; 8 were asked for"):
        attn(x[:, :1], (cos[:1], sin[:1]), cache)


@pytest.mark.parametrize("n", WORLDS)
@pytest.mark.parametrize("heads", [(8, 8), (8, 2)], ids=["mha", "gqa"])
def test_kv_cache_matches_full_forward(n, heads):
    _dist.run(n, _check_kv_cache, *heads)


def _check_bad_heads():
    m = mesh(4)
    for n_heads, n_kv_heads in [(6, 6), (8, 3), (12, 6)]:
        pattern = rf"n_heads={n_heads}, n_kv_heads={n_kv_heads}, tp=4"
        with pytest.raises(ValueError, match=pattern):
            QKVParallelLinear(4 * n_heads, n_heads, n_kv_heads, mesh=m)
        with pytest.raises(ValueError, match=pattern):
            ParallelAttention(4 * n_heads, n_heads, n_kv_heads, mesh=m)


def _check_bad_from_linear():
    with pytest.raises(ValueError, match=r"out_features=20 is not \(n_heads \+ 2 \* n_kv_heads\)"):
        QKVParallelLinear.from_linear(nn.Linear(8, 20), mesh(4), n_heads=4, n_kv_heads=2)


def test_bad_head_combinations():
    _dist.run(4, _check_bad_from_linear)
    _dist.run(4, _check_bad_heads)
