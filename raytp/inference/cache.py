"""The static KV cache of decoding: ``max_batch`` slots of ``max_len`` positions, each
slot one sequence with its own length, and how big it is made.

One tensor holds every layer's keys and values, (n_layers, 2, max_batch, kv_heads_per_rank,
capacity, head_dim), so that moving a sequence to another slot is one copy. A step
tells the layers what it is (:class:`Prefill` or :class:`Decode`) through
``cache.step``; each layer's :class:`LayerSlots` is what
:class:`~raytp.nn.ParallelAttention` calls as its ``kv_cache``:

- prefill: attention over the new prompts' own keys (causal, padding masked), whose
  keys and values are then written into their slots at positions [0, T);
- decode: each slot's new key and value written at its position, then attention of its
  one query over the slot's keys up to that position (a mask per slot, built once per
  step). The ``group`` query heads that share a key/value head attend as ``group``
  queries of that head, so the cache is never repeated or copied.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

MEMORY_FRACTION = 0.9  # of the device's memory the process may hold once the cache is made (vLLM's 0.9)
ACTIVATION_RESERVE = 2**30  # bytes kept free for activations, graphs and the sampling buffers
MAX_SLOTS = 256  # max_batch when it is sized from memory (vLLM's max_num_seqs)
CPU_MAX_BATCH, CPU_MAX_LEN = 8, 4096  # the defaults on CPU
ALIGN = 16  # positions are allocated in multiples of it (attention kernels' alignment)


@dataclass(frozen=True)
class CacheShape:
    """Slots and positions of a cache for a model of ``n_layers`` with ``kv_heads``
    key/value heads of ``head_dim`` on this rank, in ``dtype``."""

    n_layers: int
    kv_heads: int
    head_dim: int
    dtype: torch.dtype
    max_batch: int = 1
    max_len: int = 1

    @property
    def capacity(self) -> int:
        """Positions allocated per slot: ``max_len`` rounded up to :data:`ALIGN`."""
        return -(-self.max_len // ALIGN) * ALIGN

    def bytes_per_position(self) -> int:
        element = torch.empty((), dtype=self.dtype).element_size()
        return self.n_layers * 2 * self.kv_heads * self.head_dim * element

    @property
    def nbytes(self) -> int:
        return self.max_batch * self.capacity * self.bytes_per_position()


def size_cache(shape: CacheShape, max_seq_len: int, device: torch.device, max_batch: int | None,
               max_len: int | None) -> CacheShape:
    """``shape`` with ``max_batch`` and ``max_len``, those given or else sized: ``max_len``
    the model's ``max_seq_len``, ``max_batch`` as many slots as fit (at most
    :data:`MAX_SLOTS`) in the device memory free now, less what the process may not hold
    (1 - :data:`MEMORY_FRACTION` of the device) and :data:`ACTIVATION_RESERVE`; with
    ``max_batch`` given, ``max_len`` as many positions as then fit (at most max_seq_len).
    On CPU the defaults are :data:`CPU_MAX_BATCH` and :data:`CPU_MAX_LEN`."""
    if max_len is not None and max_len > max_seq_len:
        raise ValueError(f"max_len={max_len} exceeds the model's max_seq_len={max_seq_len}")
    if device.type != "cuda":
        return _with(shape, max_batch or CPU_MAX_BATCH, max_len or min(max_seq_len, CPU_MAX_LEN))
    budget = _budget(device)
    per_position = shape.bytes_per_position()
    if max_len is None and max_batch is not None:
        fit = budget // (max_batch * per_position) // ALIGN * ALIGN
        max_len = min(max_seq_len, fit)
    max_len = max_len or max_seq_len
    per_slot = _with(shape, 1, max_len).nbytes
    max_batch = max_batch or min(MAX_SLOTS, budget // per_slot)
    sized = _with(shape, max_batch, max_len)
    if max_len < 1 or max_batch < 1 or sized.nbytes > budget:
        raise ValueError(f"a KV cache of max_batch={max_batch} x max_len={max_len} positions needs "
                         f"{sized.nbytes / 2**30:.2f} GiB; {budget / 2**30:.2f} GiB is free for it on "
                         f"{device}: give a smaller max_batch or max_len")
    return sized


def _with(shape: CacheShape, max_batch: int, max_len: int) -> CacheShape:
    return CacheShape(shape.n_layers, shape.kv_heads, shape.head_dim, shape.dtype, int(max_batch),
                      int(max_len))


def _budget(device: torch.device) -> int:
    free, total = torch.cuda.mem_get_info(device)
    return max(0, int(free - (1 - MEMORY_FRACTION) * total - ACTIVATION_RESERVE))


@dataclass
class Prefill:
    """A prefill of prompts into ``slots`` (n,): ``key_mask`` (n, T) is True at each
    prompt's real positions (the rows are right-padded to T)."""

    slots: torch.Tensor
    key_mask: torch.Tensor


@dataclass
class Decode:
    """A decode step of slots [0, ``batch``), the new key of slot b at its position:
    ``write_index`` (batch, kv_heads, 1, head_dim) int64, those positions; ``mask`` (batch,
    1, 1, length) additive, 0 up to each slot's position and -inf after; attention
    reads the first ``length`` positions."""

    batch: int
    length: int
    write_index: torch.Tensor
    mask: torch.Tensor


class SlotCache:
    """Keys and values of ``shape.max_batch`` sequences (see the module docstring)."""

    def __init__(self, shape: CacheShape, device: torch.device):
        self.shape = shape
        self.kv = torch.zeros(shape.n_layers, 2, shape.max_batch, shape.kv_heads, shape.capacity,
                              shape.head_dim, dtype=shape.dtype, device=device)
        self.layers = [LayerSlots(self, self.kv[i, 0], self.kv[i, 1]) for i in range(shape.n_layers)]
        self.key_positions = torch.arange(shape.capacity, device=device)
        self.step: Prefill | Decode | None = None

    @property
    def nbytes(self) -> int:
        return self.kv.numel() * self.kv.element_size()

    def decode_step(self, positions: torch.Tensor, length: int) -> Decode:
        """The :class:`Decode` of slots [0, B) at ``positions`` (B,), attending over
        ``length`` positions (device ops only: part of a captured graph)."""
        b, s = positions.shape[0], self.shape
        visible = self.key_positions[:length] <= positions[:, None]  # (B, length)
        mask = torch.zeros(visible.shape, dtype=s.dtype, device=positions.device)
        mask = mask.masked_fill(~visible, -math.inf).view(b, 1, 1, length)
        index = positions.view(b, 1, 1, 1).expand(b, s.kv_heads, 1, s.head_dim)
        return Decode(b, length, index, mask)

    def move(self, src: int, dst: int) -> None:
        """Slot ``src``'s keys and values into slot ``dst`` (one copy)."""
        self.kv[:, :, dst] = self.kv[:, :, src]


class LayerSlots:
    """One layer's view of a :class:`SlotCache`: ``k``, ``v`` (max_batch, kv_heads,
    capacity, head_dim), and the ``attend`` that attention calls."""

    def __init__(self, cache: SlotCache, k: torch.Tensor, v: torch.Tensor):
        self.cache, self.k, self.v = cache, k, v

    def attend(self, q, k, v, attend, key_mask=None) -> torch.Tensor:
        """``q`` (B, heads, T, hd) and the new ``k``, ``v`` (B, kv_heads, T, hd), after
        RoPE -> (B, heads, T, hd); ``attend`` is the layer's own attention over given keys."""
        step = self.cache.step
        if isinstance(step, Decode):
            return self._decode(q, k, v, step)
        if not isinstance(step, Prefill):
            raise RuntimeError("a SlotCache layer was called outside a prefill or decode step")
        out = attend(q, k, v, step.key_mask)  # causal, the padding masked
        t = k.shape[2]
        self.k[step.slots, :, :t] = k
        self.v[step.slots, :, :t] = v
        return out

    def _decode(self, q, k, v, step: Decode) -> torch.Tensor:
        b, kv_heads = step.batch, self.k.shape[1]
        self.k[:b].scatter_(2, step.write_index, k)
        self.v[:b].scatter_(2, step.write_index, v)
        heads, hd = q.shape[1], q.shape[3]
        grouped = q.reshape(b, kv_heads, heads // kv_heads, hd)  # the query heads of each kv head
        keys, values = self.k[:b, :, :step.length], self.v[:b, :, :step.length]
        out = F.scaled_dot_product_attention(grouped, keys, values, attn_mask=step.mask)
        return out.reshape(b, heads, 1, hd)
