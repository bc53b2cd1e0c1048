"""The key/value cache of one attention layer, for decoding one token at a time."""

from __future__ import annotations

import torch


class KVCache:
    """Keys and values of the positions seen so far, this rank's heads only.

    Buffers (B, kv_heads_per_rank, max_len, head_dim) are allocated at the first
    :meth:`update`, from the shapes it brings, so the model never needs to know how
    many heads a rank holds. ``length`` is the number of positions cached.
    """

    def __init__(self, max_len: int):
        self.max_len = max_len
        self.length = 0
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append ``k``, ``v`` (B, heads, T, head_dim); return the keys and values of
        every cached position, (B, heads, length + T, head_dim)."""
        start, end = self.length, self.length + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"the KV cache holds {self.max_len} positions; {end} were asked for")
        if self.k is None:
            shape = (k.shape[0], k.shape[1], self.max_len, k.shape[3])
            self.k, self.v = k.new_zeros(shape), v.new_zeros(shape)
        self.k[:, :, start:end] = k
        self.v[:, :, start:end] = v
        self.length = end
        return self.k[:, :, :end], self.v[:, :, :end]

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attend,
               key_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Append ``k``, ``v`` and return ``attend(q, keys, values, key_mask)`` over every
        cached position (the protocol :class:`~raytp.nn.ParallelAttention` calls a cache by)."""
        k, v = self.update(k, v)
        return attend(q, k, v, key_mask)

    def __repr__(self):
        return f"KVCache(length={self.length}, max_len={self.max_len})"
