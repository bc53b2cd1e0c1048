"""Rotary position embeddings (RoPE), in the rotate-half layout of GPT-NeoX and
Hugging Face Llama: dims [0, head_dim / 2) pair with [head_dim / 2, head_dim)."""

from __future__ import annotations

import torch

from raytp.nn.fused import Fused


def rope_tables(head_dim: int, max_len: int, theta: float = 10000.0, *, device=None,
                dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """``(cos, sin)``, each (max_len, head_dim): row p rotates position p. Computed in
    float64 and cast, so tables agree across dtypes and devices."""
    if head_dim % 2:
        raise ValueError(f"RoPE needs an even head_dim, got {head_dim}")
    inv_freq = theta ** -(torch.arange(0, head_dim, 2, dtype=torch.float64, device=device) / head_dim)
    angles = torch.outer(torch.arange(max_len, dtype=torch.float64, device=device), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)  # (max_len, head_dim)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


def _rope_qk(q, k, cos, sin):
    return _rope(q, cos, sin), _rope(k, cos, sin)


_fused_rope, _fused_rope_qk = Fused(_rope), Fused(_rope_qk)  # one kernel each way when training on CUDA


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` (B, T, heads, head_dim) by the tables of its positions: (T, head_dim),
    the same positions in every row, or (B, T, head_dim), each row its own (decoding
    slots of different lengths)."""
    return _fused_rope(x, cos.unsqueeze(-2), sin.unsqueeze(-2))


def apply_rope_qk(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
                  sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`apply_rope` of queries and keys at the same positions, in one fused call."""
    return _fused_rope_qk(q, k, cos.unsqueeze(-2), sin.unsqueeze(-2))
