"""Plain PyTorch models for the benchmark's one-GPU and PyTorch-TP contenders, and
PyTorch's own TP plans for them (torchtitan's Llama plan).

The models do not know they may be sharded: attention reshapes with ``-1`` heads, so
PyTorch's colwise / rowwise styles work on them with the local head counts. Names
follow torchtitan (``wq``, ``wk``, ``wv``, ``wo``; ``w1`` gate, ``w3`` up, ``w2`` down).
RoPE is raytp's (:mod:`raytp.nn.rotary`, pure PyTorch), so that every contender
computes the same function.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from raytp.nn.rotary import apply_rope, rope_tables


class MLP(nn.Module):
    """``w2(gelu(w1 x))``, no bias: (..., hidden) -> (..., hidden)."""

    def __init__(self, hidden: int, ffn: int, *, device=None, dtype=None):
        super().__init__()
        self.w1 = nn.Linear(hidden, ffn, bias=False, device=device, dtype=dtype)
        self.w2 = nn.Linear(ffn, hidden, bias=False, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.gelu(self.w1(x)))


class FeedForward(nn.Module):
    """SwiGLU: ``w2(silu(w1 x) * w3 x)``, no bias."""

    def __init__(self, d_model: int, ffn: int, *, device=None, dtype=None):
        super().__init__()
        factory = {"bias": False, "device": device, "dtype": dtype}
        self.w1 = nn.Linear(d_model, ffn, **factory)
        self.w3 = nn.Linear(d_model, ffn, **factory)
        self.w2 = nn.Linear(ffn, d_model, **factory)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Attention(nn.Module):
    """Causal grouped-query self-attention with RoPE, no bias.

    ``forward(x (B, T, d_model), rope=(cos, sin) each (T, head_dim))``. Under PyTorch TP
    the projections give (B, T, local heads * head_dim) and the ``-1`` reshapes find
    the local head counts."""

    def __init__(self, d_model: int, n_heads: int, n_kv_heads: int, *, device=None, dtype=None):
        super().__init__()
        self.head_dim = d_model // n_heads
        factory = {"bias": False, "device": device, "dtype": dtype}
        self.wq = nn.Linear(d_model, n_heads * self.head_dim, **factory)
        self.wk = nn.Linear(d_model, n_kv_heads * self.head_dim, **factory)
        self.wv = nn.Linear(d_model, n_kv_heads * self.head_dim, **factory)
        self.wo = nn.Linear(n_heads * self.head_dim, d_model, **factory)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        B, T = x.shape[:2]
        q = self.wq(x).view(B, T, -1, self.head_dim)  # (B, T, heads, head_dim)
        k = self.wk(x).view(B, T, -1, self.head_dim)  # (B, T, kv_heads, head_dim)
        v = self.wv(x).view(B, T, -1, self.head_dim)
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, heads, T, head_dim)
        group = q.shape[1] // k.shape[1]  # query heads per key/value head, as raytp's attention
        if group > 1:
            k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.wo(out.transpose(1, 2).reshape(B, T, -1))


class Block(nn.Module):
    """Pre-norm Llama block: ``h = x + attention(norm(x))``, ``h + feed_forward(norm(h))``."""

    def __init__(self, d_model: int, n_heads: int, n_kv_heads: int, ffn: int, *, eps: float = 1e-5,
                 device=None, dtype=None):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.attention_norm = nn.RMSNorm(d_model, eps=eps, **factory)
        self.attention = Attention(d_model, n_heads, n_kv_heads, **factory)
        self.ffn_norm = nn.RMSNorm(d_model, eps=eps, **factory)
        self.feed_forward = FeedForward(d_model, ffn, **factory)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), rope)
        return h + self.feed_forward(self.ffn_norm(h))


class GPT(nn.Module):
    """Llama-style decoder: embedding, blocks, RMSNorm, untied LM head.
    ``forward(ids (B, T))`` -> logits (B, T, vocab)."""

    def __init__(self, vocab_size: int, d_model: int, n_layers: int, n_heads: int, n_kv_heads: int,
                 ffn: int, max_seq_len: int, *, rope_theta: float = 10000.0, eps: float = 1e-5,
                 device=None, dtype=None):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.tok_embeddings = nn.Embedding(vocab_size, d_model, **factory)
        self.layers = nn.ModuleList(Block(d_model, n_heads, n_kv_heads, ffn, eps=eps, **factory)
                                    for _ in range(n_layers))
        self.norm = nn.RMSNorm(d_model, eps=eps, **factory)
        self.output = nn.Linear(d_model, vocab_size, bias=False, **factory)
        cos, sin = rope_tables(d_model // n_heads, max_seq_len, rope_theta, device=device,
                               dtype=dtype or torch.get_default_dtype())
        self.register_buffer("rope_cos", cos, persistent=False)  # (max_seq_len, head_dim)
        self.register_buffer("rope_sin", sin, persistent=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        T = ids.shape[1]
        rope = (self.rope_cos[:T], self.rope_sin[:T])
        h = self.tok_embeddings(ids)
        for layer in self.layers:
            h = layer(h, rope)
        return self.output(self.norm(h))


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token loss of (B, T, V) logits against (B, T) labels, in float32 (under
    :func:`torch.distributed.tensor.parallel.loss_parallel` for vocabulary-sharded logits)."""
    return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(0, 1))


# -- PyTorch TP (torch.distributed.tensor.parallel), torchtitan's plan ------------------------


def torch_tp_mlp(mlp: MLP, mesh) -> MLP:
    """``w1`` colwise, ``w2`` rowwise: input and output replicated local tensors."""
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    return parallelize_module(mlp, mesh, {"w1": ColwiseParallel(), "w2": RowwiseParallel()})


def _block_plan(sequence_parallel: bool) -> dict:
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        PrepareModuleInput,
        RowwiseParallel,
        SequenceParallel,
    )

    plan = {f"attention.{w}": ColwiseParallel() for w in ("wq", "wk", "wv")}
    plan.update({f"feed_forward.{w}": ColwiseParallel() for w in ("w1", "w3")})
    if not sequence_parallel:
        plan.update({"attention.wo": RowwiseParallel(), "feed_forward.w2": RowwiseParallel()})
        return plan
    # the residual stream is (B, T / tp, d) local; norms run on Shard(1) DTensors
    plan.update({
        "attention_norm": SequenceParallel(),
        "attention": PrepareModuleInput(input_layouts=(Shard(1), None),
                                        desired_input_layouts=(Replicate(), None)),
        "attention.wo": RowwiseParallel(output_layouts=Shard(1)),
        "ffn_norm": SequenceParallel(),
        "feed_forward": PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),)),
        "feed_forward.w2": RowwiseParallel(output_layouts=Shard(1)),
    })
    return plan


def torch_tp_block(block: Block, mesh, sequence_parallel: bool = False) -> Block:
    """torchtitan's per-block plan. Without sequence parallelism the input and output
    are replicated (B, T, d) local tensors; with it, local (B, T / tp, d) chunks."""
    from torch.distributed.tensor.parallel import parallelize_module

    return parallelize_module(block, mesh, _block_plan(sequence_parallel))


def torch_tp_gpt(gpt: GPT, mesh) -> GPT:
    """torchtitan's plan without sequence parallelism: the embedding rowwise (vocabulary
    rows sharded, output all-reduced), each block as :func:`torch_tp_block`, the LM head
    colwise with its logits left a vocabulary-sharded DTensor for
    :func:`~torch.distributed.tensor.parallel.loss_parallel`."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    parallelize_module(gpt, mesh, {
        "tok_embeddings": RowwiseParallel(input_layouts=Replicate()),
        "output": ColwiseParallel(output_layouts=Shard(-1), use_local_output=False),
    })
    for layer in gpt.layers:
        torch_tp_block(layer, mesh)
    return gpt
