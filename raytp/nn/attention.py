"""Self-attention (causal, or bidirectional for encoders) split over the TP group by
heads (Megatron-LM, section 3).

The fused Q/K/V projection is column-parallel: each rank holds the projections of
its query heads and of the key/value heads they use, computes attention on them
alone, and a row-parallel output projection sums the heads' contributions. With
grouped-query attention and fewer key/value heads than ranks, each key/value head
is held by the ``tp / n_kv_heads`` ranks whose query heads use it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from raytp.mesh import DeviceMesh
from raytp.nn.kv_cache import KVCache
from raytp.nn.linear import ColumnParallelLinear, RowParallelLinear
from raytp.nn.rotary import apply_rope_qk
from raytp.params import materialize_
from raytp.random import RNGTracker


def check_heads(n_heads: int, n_kv_heads: int, tp: int) -> None:
    """Raise unless the heads split over ``tp`` ranks: tp divides n_heads, n_kv_heads
    divides n_heads, and n_kv_heads is a multiple of tp or divides it."""
    if n_heads % tp or n_heads % n_kv_heads or (n_kv_heads % tp and tp % n_kv_heads):
        raise ValueError(f"n_heads={n_heads}, n_kv_heads={n_kv_heads}, tp={tp}: n_heads must be "
                         "divisible by tp and by n_kv_heads, and n_kv_heads must divide tp or be "
                         "a multiple of it")


class QKVParallelLinear(ColumnParallelLinear):
    """The fused [Q | K | V] projection, column-parallel by heads.

    Input (..., d_model), replicated; or (B, T / tp, d_model) with
    ``sequence_parallel``. Full weight (n_heads + 2 * n_kv_heads) * head_dim rows,
    as blocks [Q | K | V]. Rank r holds query heads [r * n_heads / tp, (r + 1) *
    n_heads / tp); with n_kv_heads >= tp, key/value heads [r * n_kv_heads / tp, ...);
    with n_kv_heads < tp, key/value head ``r * n_kv_heads // tp``, replicated over
    the tp / n_kv_heads ranks sharing it, whose partial gradients
    :func:`raytp.sync_grads` sums. Output ``(q, k, v)``: (..., n_heads / tp *
    head_dim) and twice (..., max(n_kv_heads / tp, 1) * head_dim). ``init_std``: see
    :meth:`ColumnParallelLinear.reset_parameters`.
    Collectives: those of :class:`ColumnParallelLinear`.
    """

    def __init__(self, d_model: int, n_heads: int, n_kv_heads: int | None = None, *,
                 mesh: DeviceMesh, head_dim: int | None = None, bias: bool = True,
                 sequence_parallel: bool = False, device=None, dtype=None,
                 init_std: float | None = None):
        n_kv_heads = n_kv_heads or n_heads
        tp = mesh.tp_size
        check_heads(n_heads, n_kv_heads, tp)
        if head_dim is None:
            if d_model % n_heads:
                raise ValueError(f"d_model={d_model} is not divisible by n_heads={n_heads}; "
                                 "give head_dim")
            head_dim = d_model // n_heads
        kv_shards = min(n_kv_heads, tp)
        blocks = ((n_heads * head_dim, tp), (n_kv_heads * head_dim, kv_shards),
                  (n_kv_heads * head_dim, kv_shards))
        super().__init__(d_model, (n_heads + 2 * n_kv_heads) * head_dim, mesh=mesh, bias=bias,
                         blocks=blocks, sequence_parallel=sequence_parallel, device=device,
                         dtype=dtype, init_std=init_std)
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, head_dim

    @classmethod
    def from_linear(cls, linear: nn.Linear, mesh: DeviceMesh, *, n_heads: int,
                    n_kv_heads: int | None = None, **kwargs) -> QKVParallelLinear:
        """The layer holding this rank's heads of ``linear``, a fused [Q | K | V] projection."""
        n_kv_heads = n_kv_heads or n_heads
        head_dim, rest = divmod(linear.out_features, n_heads + 2 * n_kv_heads)
        if rest:
            raise ValueError(f"out_features={linear.out_features} is not (n_heads + 2 * n_kv_heads) "
                             f"* head_dim for n_heads={n_heads}, n_kv_heads={n_kv_heads}")
        layer = cls(linear.in_features, n_heads, n_kv_heads, mesh=mesh, head_dim=head_dim,
                    bias=linear.bias is not None, device="meta", dtype=linear.weight.dtype, **kwargs)
        materialize_(layer, linear.weight.device)
        return layer.load_full_(linear.weight, linear.bias)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return tuple(super().forward(x).split(self.local_block_sizes, dim=-1))


def _causal_mask(q_len: int, k_len: int, device) -> torch.Tensor | None:
    """(q_len, k_len) bool: the queries are the last q_len of k_len positions."""
    if q_len == 1:
        return None  # one new token sees every cached position
    offset = k_len - q_len
    q_pos = torch.arange(offset, k_len, device=device)
    return torch.arange(k_len, device=device)[None, :] <= q_pos[:, None]


def attention_mask(q_len: int, k_len: int, causal: bool, key_mask: torch.Tensor | None,
                   device) -> tuple[torch.Tensor | None, bool]:
    """``(attn_mask, is_causal)`` for ``scaled_dot_product_attention``. ``key_mask`` (B, k_len),
    nonzero where a key may be attended to (a padding mask), becomes (B, 1, 1, k_len) bool,
    combined with the causal mask when ``causal``."""
    if key_mask is None:
        if not causal:
            return None, False
        return (None, True) if q_len == k_len else (_causal_mask(q_len, k_len, device), False)
    mask = key_mask.to(device=device, dtype=torch.bool)[:, None, None, :]  # (B, 1, 1, k_len)
    causal_mask = _causal_mask(q_len, k_len, device) if causal else None
    return (mask if causal_mask is None else mask & causal_mask), False


class ParallelAttention(nn.Module):
    """Multi-head (grouped-query) self-attention split over the TP group by heads: causal,
    or bidirectional with ``causal=False`` (encoders).

    Input and output (B, T, d_model), replicated; or (B, T / tp, d_model), split along
    the sequence, with ``sequence_parallel``. ``qkv`` is a :class:`QKVParallelLinear`,
    ``proj`` a row-parallel (n_heads * head_dim -> d_model) projection. In between,
    (B, heads_per_rank, T, head_dim) through ``scaled_dot_product_attention``.
    ``forward(x, rope=(cos, sin), kv_cache=...)``: the (T, head_dim) or (B, T, head_dim)
    RoPE tables of the input's positions (None for no rotation), and a cache to append
    to and attend over, called as ``kv_cache.attend(q, k, v, attend, attn_mask)`` (a
    :class:`KVCache`, or one layer of a :class:`raytp.inference.SlotCache`); ``attn_mask``
    (B, T_keys), nonzero at the keys that may be attended to (padding masked out).
    Attention-probability dropout draws from ``rng``'s sharded state: each rank holds
    different heads. ``init_std`` initializes ``qkv`` and
    ``out_init_std`` (default ``init_std``; GPT-2 scales it by 1 / sqrt(2 n_layers)) ``proj``:
    normal(0, std) weights and zero biases, or ``nn.Linear``'s initialization for None.
    Collectives: forward one all-reduce; backward one all-reduce (under sequence
    parallelism, each an all-gather and a reduce-scatter).
    """

    def __init__(self, d_model: int, n_heads: int, n_kv_heads: int | None = None, *,
                 mesh: DeviceMesh, bias: bool = True, sequence_parallel: bool = False,
                 dropout: float = 0.0, rng: RNGTracker | None = None, causal: bool = True,
                 device=None, dtype=None, init_std: float | None = None,
                 out_init_std: float | None = None):
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model={d_model} is not divisible by n_heads={n_heads}")
        if dropout > 0 and rng is None:
            raise ValueError("attention dropout > 0 needs an RNGTracker (rng=...)")
        self.head_dim = d_model // n_heads
        self.dropout, self.rng, self.causal = dropout, rng, causal
        self.sequence_parallel = sequence_parallel
        factory = {"mesh": mesh, "bias": bias, "sequence_parallel": sequence_parallel,
                   "device": device, "dtype": dtype}
        self.qkv = QKVParallelLinear(d_model, n_heads, n_kv_heads, init_std=init_std, **factory)
        self.proj = RowParallelLinear(n_heads * self.head_dim, d_model,
                                      init_std=init_std if out_init_std is None else out_init_std,
                                      **factory)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None = None,
                kv_cache: KVCache | None = None, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        q, k, v = self.qkv(x)  # (B, T, local features) each; all of T under sequence parallelism
        B, T = q.shape[:2]
        q, k, v = (t.view(B, T, -1, self.head_dim) for t in (q, k, v))  # (B, T, heads_per_rank, hd)
        if rope is not None:
            q, k = apply_rope_qk(q, k, *rope)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, heads_per_rank, T, hd)
        if kv_cache is None:
            out = self._attend(q, k, v, attn_mask)  # (B, heads_per_rank, T, hd)
        else:  # the cache stores k, v and attends over what it holds (KVCache, raytp.inference)
            out = kv_cache.attend(q, k, v, self._attend, attn_mask)
        return self.proj(out.transpose(1, 2).reshape(B, T, -1))

    def _attend(self, q, k, v, key_mask):
        group = q.shape[1] // k.shape[1]  # query heads per key/value head
        if group > 1:
            k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        mask, is_causal = attention_mask(q.shape[2], k.shape[2], self.causal, key_mask, q.device)
        p = self.dropout if self.training else 0.0
        if p == 0.0:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal)
        with self.rng.fork("sharded"):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p,
                                                  is_causal=is_causal)
