"""What to sample (:class:`SamplingParams`), and choosing each row's next token on the
device from its vocabulary-parallel logits, the same token on every TP rank.

Sampling is Gumbel-max: the token is ``argmax(logits / T + g)`` over the tokens that
top-k and top-p keep, ``g`` Gumbel noise drawn from a counter-based hash of (the
request's key, the position of the token being chosen, the global vocabulary id)
(:func:`uniform`). That is an exact draw from ``softmax(logits / T)`` restricted and
renormalized; it needs no generator state (training's RNG is untouched), is the same
noise at every tp (it depends on global ids only), reproduces exactly for a seed, and
is a fixed sequence of kernels a CUDA graph can hold. Greedy rows (``T == 0``) take the
argmax, ties to the lowest id.

What crosses the TP group per step (``choose``, by :class:`Kind`):

- ``greedy`` and ``gumbel``: each rank's (max, id) per row, one all-gather of (B, 2)
  float64; every rank then picks the same winner.
- ``topk``: each rank's top-k (values, ids), one all-gather of (B, k, 2) float64; the
  global top-k of those candidates, then top-p among them.
- ``full`` (top-p without top-k, or rows of different kinds in one batch): the whole
  (B, V_padded) scores, one all-gather, because the nucleus of the full distribution
  needs its sorted order.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch

from raytp.comm import functional as cf
from raytp.comm.backend import Communicator

MASK32 = 0xFFFFFFFF


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class SamplingParams:
    """How the new tokens of a prompt are chosen.

    - ``max_new_tokens``: at most this many new ids (>= 1).
    - ``temperature``: 0 is greedy (the argmax); > 0 samples ``softmax(logits / temperature)``.
    - ``top_k``: sample among the ``top_k`` most likely ids only (None: all).
    - ``top_p``: then among the smallest set of most likely ids whose probability (after
      top-k, renormalized) reaches ``top_p``, in (0, 1] (None: all).
    - ``stop_token_ids``: a sequence ends at the first of these ids, which is returned as
      its last id.
    - ``seed``: the same seed gives the same ids, at every tp and on every run; None draws
      one per call. Each prompt's draws depend on the seed and the prompt's index in the call.
    """

    max_new_tokens: int
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    stop_token_ids: tuple[int, ...] = ()
    seed: int | None = None

    def __post_init__(self):
        if not _is_int(self.max_new_tokens) or self.max_new_tokens < 1:
            raise ValueError(f"SamplingParams: max_new_tokens={self.max_new_tokens!r} must be an "
                             "integer >= 1")
        t = self.temperature
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t < 0:
            raise ValueError(f"SamplingParams: temperature={t!r} must be a finite number >= 0 "
                             "(0: greedy)")
        if self.top_k is not None and (not _is_int(self.top_k) or self.top_k < 1):
            raise ValueError(f"SamplingParams: top_k={self.top_k!r} must be an integer >= 1 (or None)")
        p = self.top_p
        if p is not None and (isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 < p <= 1):
            raise ValueError(f"SamplingParams: top_p={p!r} must be in (0, 1] (or None)")
        stops = self.stop_token_ids
        if isinstance(stops, (str, bytes)) or not isinstance(stops, Iterable):
            raise ValueError(f"SamplingParams: stop_token_ids={stops!r} must be a sequence of token ids")
        stops = tuple(stops)
        if not all(_is_int(i) and i >= 0 for i in stops):
            raise ValueError(f"SamplingParams: stop_token_ids={stops!r} must be non-negative integers")
        object.__setattr__(self, "stop_token_ids", stops)
        object.__setattr__(self, "temperature", float(t))
        if self.seed is not None and not _is_int(self.seed):
            raise ValueError(f"SamplingParams: seed={self.seed!r} must be an integer (or None)")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def nucleus(self) -> float | None:
        """``top_p`` where it restricts anything (None for None or 1)."""
        return self.top_p if self.top_p is not None and self.top_p < 1 else None


class Kind(NamedTuple):
    """How a batch of rows is sampled (see the module docstring); ``k`` for ``topk``."""

    name: str
    k: int = 0


GREEDY, GUMBEL, FULL = Kind("greedy"), Kind("gumbel"), Kind("full")


def kind_of(params: Iterable[SamplingParams], vocab_size: int) -> Kind:
    """The cheapest :class:`Kind` that samples every row of ``params`` exactly."""
    sampled = [p for p in params if not p.greedy]
    if not sampled:
        return GREEDY
    if all(p.top_k is None and p.nucleus is None for p in sampled):
        return GUMBEL
    if all(p.top_k is not None for p in sampled):
        return Kind("topk", min(max(p.top_k for p in sampled), vocab_size))
    return FULL


def _mix64(x: int) -> int:
    """SplitMix64's finalizer on a Python int (mod 2^64)."""
    x &= 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return x ^ (x >> 31)


def request_key(seed: int, index: int) -> int:
    """The 32-bit key of the request ``index`` of a call seeded ``seed``."""
    return _mix64(_mix64(seed) ^ (index * 0x9E3779B97F4A7C15)) & MASK32


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """``x * c mod 2^32`` for int64 ``x`` in [0, 2^32), in 16-bit halves so nothing overflows."""
    return (x * (c & 0xFFFF) + (((x * (c >> 16)) & 0xFFFF) << 16)) & MASK32


def _fmix32(h: torch.Tensor) -> torch.Tensor:
    """MurmurHash3's 32-bit finalizer (a bijection that mixes every bit into every bit)."""
    h = h ^ (h >> 16)
    h = _mul32(h, 0x85EBCA6B)
    h = h ^ (h >> 13)
    h = _mul32(h, 0xC2B2AE35)
    return h ^ (h >> 16)


def uniform(keys: torch.Tensor, positions: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """(B, N) float32 uniforms in (0, 1), a hash of (``keys`` (B,), ``positions`` (B,),
    ``ids`` (N,) or (B, N)), all int64: the same numbers for the same triple, on any device."""
    row = _fmix32(keys ^ _mul32(positions & MASK32, 0x9E3779B1))[:, None]  # (B, 1)
    h = _fmix32((row + _mul32(ids & MASK32, 0x85EBCA77)) & MASK32)
    h = _fmix32(h ^ row)
    return ((h >> 8).to(torch.float32) + 0.5) * 2.0 ** -24


def gumbel(keys: torch.Tensor, positions: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Gumbel(0, 1) noise of :func:`uniform`'s numbers, (B, N) float32."""
    return -torch.log(-torch.log(uniform(keys, positions, ids)))


@dataclass
class Rows:
    """Per-row sampling inputs on the device, each (B,): ``temperature`` float32 (0:
    greedy), ``top_k`` int64 (the vocabulary size where none), ``top_p`` float32 (inf
    where it restricts nothing, so that rounding in the cumulative sum masks nothing),
    ``key`` int64 (:func:`request_key`), ``position`` int64 (of the token chosen)."""

    temperature: torch.Tensor
    top_k: torch.Tensor
    top_p: torch.Tensor
    key: torch.Tensor
    position: torch.Tensor

    @classmethod
    def of(cls, params: Sequence[SamplingParams], keys: Sequence[int], positions: Sequence[int],
           vocab_size: int, device) -> Rows:
        """Rows from host values (one H2D copy per field)."""
        def tensor(values, dtype):
            return torch.tensor(list(values), dtype=dtype).to(device)

        return cls(tensor((p.temperature for p in params), torch.float32),
                   tensor((p.top_k or vocab_size for p in params), torch.int64),
                   tensor((math.inf if p.nucleus is None else p.nucleus for p in params), torch.float32),
                   tensor(keys, torch.int64), tensor(positions, torch.int64))


@dataclass(frozen=True)
class VocabShard:
    """This rank's columns [``start``, ``start + size``) of a vocabulary of ``vocab_size``
    ids padded to ``size * comm.size``; ``comm`` the TP group (None: one rank)."""

    start: int
    size: int
    vocab_size: int
    comm: Communicator | None = None

    @property
    def tp(self) -> int:
        return 1 if self.comm is None else self.comm.size

    @property
    def padded(self) -> bool:
        return self.start + self.size > self.vocab_size


def choose(logits: torch.Tensor, rows: Rows, kind: Kind, shard: VocabShard) -> torch.Tensor:
    """(B,) int64 next ids, the same on every rank of ``shard.comm``, from this rank's
    (B, ``shard.size``) logits. Collectives: one all-gather (module docstring)."""
    scores = logits.to(torch.promote_types(logits.dtype, torch.float32))
    if shard.padded:
        ids = torch.arange(shard.start, shard.start + shard.size, device=scores.device)
        scores = scores.masked_fill(ids >= shard.vocab_size, -math.inf)
    if kind.name == "greedy":
        return _pick_max(scores, shard)
    sampled = rows.temperature > 0  # (B,)
    scores = scores / torch.where(sampled, rows.temperature, 1.0).to(scores.dtype)[:, None]
    if kind.name == "gumbel":
        ids = torch.arange(shard.start, shard.start + shard.size, device=scores.device)
        return _pick_max(scores + _noise(rows, ids, sampled, scores.dtype), shard)
    if kind.name == "topk":
        values, ids = _gathered_top_k(scores, kind.k, shard)
    else:
        values, ids = _gathered_sorted(scores, shard)
    values = _restrict(values, rows)
    best = (values + _noise(rows, ids, sampled, values.dtype)).argmax(-1, keepdim=True)
    return ids.gather(-1, best)[:, 0]


def _noise(rows: Rows, ids: torch.Tensor, sampled: torch.Tensor, dtype) -> torch.Tensor:
    """Gumbel noise for ``ids`` ((N,) or (B, N)), zero on greedy rows."""
    return gumbel(rows.key, rows.position, ids).to(dtype) * sampled[:, None]


def _pick_max(scores: torch.Tensor, shard: VocabShard) -> torch.Tensor:
    """The global argmax of vocabulary-parallel ``scores`` (B, V_r): each rank's (max, id),
    gathered; the largest wins, ties to the lowest id (rank order is id order)."""
    values, local = scores.max(-1)
    ids = local + shard.start
    if shard.tp == 1:
        return ids
    pairs = torch.stack([values.to(torch.float64), ids.to(torch.float64)], -1)  # (B, 2), exact
    gathered = cf.all_gather(pairs, shard.comm, 0).view(shard.tp, -1, 2)  # (tp, B, 2)
    winner = gathered[..., 0].argmax(0, keepdim=True)  # (1, B): the first rank holding the max
    return gathered[..., 1].gather(0, winner)[0].to(torch.int64)


def _gathered_top_k(scores: torch.Tensor, k: int, shard: VocabShard):
    """The global top ``k`` of vocabulary-parallel ``scores``, descending: (values, ids),
    each (B, k), from each rank's own top k."""
    values, local = scores.topk(min(k, shard.size), dim=-1)
    ids = local + shard.start
    if shard.tp > 1:
        pairs = torch.stack([values.to(torch.float64), ids.to(torch.float64)], -1)  # (B, k_r, 2)
        gathered = cf.all_gather(pairs, shard.comm, 0).view(shard.tp, *pairs.shape)
        gathered = gathered.permute(1, 0, 2, 3).flatten(1, 2)  # (B, tp * k_r, 2)
        values, ids = gathered[..., 0].to(scores.dtype), gathered[..., 1].to(torch.int64)
    values, order = values.topk(min(k, values.shape[-1]), dim=-1)
    return values, ids.gather(-1, order)


def _gathered_sorted(scores: torch.Tensor, shard: VocabShard):
    """Every score of the vocabulary, sorted descending (ties by id): (values, ids), each
    (B, vocab_size). Gathers the (B, V_padded) scores at tp > 1."""
    if shard.tp > 1:
        scores = cf.all_gather(scores.contiguous(), shard.comm, -1)
    values, ids = scores[:, :shard.vocab_size].sort(dim=-1, descending=True, stable=True)
    return values, ids


def _restrict(values: torch.Tensor, rows: Rows) -> torch.Tensor:
    """Descending candidate scores (B, N) with those past each row's top-k, then outside
    its top-p nucleus (of the renormalized top-k distribution), set to -inf."""
    rank = torch.arange(values.shape[-1], device=values.device)
    values = values.masked_fill(rank >= rows.top_k[:, None], -math.inf)
    probs = torch.softmax(values, dim=-1)
    before = probs.cumsum(-1) - probs  # the mass of the more likely candidates
    return values.masked_fill(before >= rows.top_p[:, None].to(values.dtype), -math.inf)
