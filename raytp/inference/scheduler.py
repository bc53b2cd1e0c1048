"""Requests, their checks, and continuous batching: which request holds which slot.

Every TP rank of a group runs the same :class:`Scheduler` on the same requests and the
same chosen tokens, so every rank makes the same decisions without talking. Waiting
requests take the lowest free slots (prefill first, in order, a few prompts at a time);
a decode step runs slots [0, b) for the smallest bucket b that holds every active slot;
a slot whose sequence ends (a stop id, or its ``max_new_tokens``) takes the next waiting
request at the next step. When nothing waits and the active slots would fit a smaller
bucket, the highest ones move down (:meth:`Scheduler.compact`).
"""

from __future__ import annotations

import secrets
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from raytp.inference.sampling import SamplingParams, request_key

PREFILL_TOKENS = 4096  # padded prompt positions per prefill batch (one longer prompt goes alone)
MIN_LENGTH_BUCKET = 64  # attention reads a power of two of positions, at least this many


@dataclass(frozen=True)
class Request:
    """Prompt ``index`` of a call (its events are tagged with it): its ids, how to sample
    it and the seed of the call (resolved: never None). ``key_index`` is the index its
    draws are keyed by when that is not ``index`` (a server gives every request of every
    client its own ``index``, and keys prompt i of a client's call by i, as
    ``cluster.generate`` of that call alone does)."""

    index: int
    prompt: tuple[int, ...]
    sampling: SamplingParams
    seed: int
    key_index: int | None = None

    @property
    def key(self) -> int:
        return request_key(self.seed, self.index if self.key_index is None else self.key_index)

    @property
    def positions(self) -> int:
        """Positions the request may fill: its prompt and every new id."""
        return len(self.prompt) + self.sampling.max_new_tokens


def as_prompts(prompts) -> list[tuple[int, ...]]:
    """``prompts`` (a sequence of id sequences of any lengths, or a 2-D array) as tuples of
    ints; a ValueError naming the prompt for an empty one or ids that are not integers."""
    if hasattr(prompts, "detach"):
        prompts = prompts.detach().cpu().numpy()
    if isinstance(prompts, np.ndarray) and prompts.ndim != 2:
        raise ValueError(f"prompts as an array must be 2-D (prompts, ids), got shape {prompts.shape}")
    if isinstance(prompts, (str, bytes)) or not isinstance(prompts, (Sequence, np.ndarray)):
        raise ValueError(f"prompts must be a list of token-id lists or a 2-D array, got "
                         f"{type(prompts).__name__}")
    out = []
    for i, prompt in enumerate(prompts):
        ids = np.asarray(prompt.detach().cpu() if hasattr(prompt, "detach") else prompt)
        if ids.ndim != 1 or ids.size == 0:
            raise ValueError(f"prompt {i} is empty or not a 1-D list of ids (shape {ids.shape}): every "
                             "prompt needs at least one token id")
        if ids.dtype.kind not in "iu":
            raise ValueError(f"prompt {i} has dtype {ids.dtype}: token ids are integers")
        out.append(tuple(int(t) for t in ids))
    return out


def make_requests(prompts, sampling: SamplingParams, *, vocab_size: int, max_seq_len: int,
                  max_len: int | None = None) -> list[Request]:
    """Checked :class:`Request` s of ``prompts`` (see :func:`as_prompts`): every id in [0,
    ``vocab_size``), each prompt plus ``max_new_tokens`` within ``max_seq_len`` and the
    cache's ``max_len`` (None: not known yet). A ValueError names the first offender."""
    if not isinstance(sampling, SamplingParams):
        raise TypeError(f"sampling must be a raytp.SamplingParams, got {type(sampling).__name__}")
    bad_stops = [t for t in sampling.stop_token_ids if t >= vocab_size]
    if bad_stops:
        raise ValueError(f"stop_token_ids {bad_stops} are outside the vocabulary [0, {vocab_size})")
    checked = as_prompts(prompts)
    seed = sampling.seed if sampling.seed is not None else secrets.randbits(63)
    for i, prompt in enumerate(checked):
        bad = next((t for t in prompt if not 0 <= t < vocab_size), None)
        if bad is not None:
            raise ValueError(f"prompt {i} holds id {bad}, outside the vocabulary [0, {vocab_size})")
        need = len(prompt) + sampling.max_new_tokens
        for limit, name in ((max_seq_len, "the model's max_seq_len"), (max_len, "the KV cache's max_len")):
            if limit is not None and need > limit:
                raise ValueError(f"prompt {i} has {len(prompt)} ids; with max_new_tokens="
                                 f"{sampling.max_new_tokens} it needs {need} positions, beyond "
                                 f"{name}={limit}")
    return [Request(i, p, sampling, seed) for i, p in enumerate(checked)]


@dataclass
class Slot:
    """The request a slot holds and the ids chosen for it so far."""

    request: Request
    generated: int = 0

    @property
    def position(self) -> int:
        """Where the next decode step writes: the position of the last id chosen."""
        return len(self.request.prompt) + self.generated - 1


def bucket(n: int, limit: int) -> int:
    """The smallest power of two >= n, at most ``limit``."""
    return min(limit, 1 << max(0, n - 1).bit_length())


class Scheduler:
    """Continuous batching over ``max_batch`` slots (see the module docstring)."""

    def __init__(self, max_batch: int, capacity: int):
        self.max_batch, self.capacity = max_batch, capacity
        self.slots: list[Slot | None] = [None] * max_batch
        self.waiting: deque[Request] = deque()

    @property
    def idle(self) -> bool:
        return not self.waiting and not self.active()

    def add(self, requests: Sequence[Request]) -> None:
        self.waiting.extend(requests)

    def cancel(self, indices: Sequence[int]) -> list[int]:
        """Drop the requests of ``indices`` (a client gone, a stop string reached): out of
        the queue, their slots freed for the next waiting request. Unknown indices (done
        already, or another DP group's) are ignored; the indices dropped, in slot order."""
        drop = set(indices)
        if not drop:
            return []
        self.waiting = deque(r for r in self.waiting if r.index not in drop)
        dropped = []
        for i, held in enumerate(self.slots):
            if held is not None and held.request.index in drop:
                self.slots[i] = None
                dropped.append(held.request.index)
        return dropped

    def active(self) -> list[int]:
        return [i for i, s in enumerate(self.slots) if s is not None]

    def admit(self) -> list[tuple[int, Request]]:
        """Waiting requests into the lowest free slots, as many as one prefill takes
        (:data:`PREFILL_TOKENS` padded positions, at least one prompt)."""
        free = [i for i, s in enumerate(self.slots) if s is None]
        taken: list[tuple[int, Request]] = []
        longest = 0
        while self.waiting and len(taken) < len(free):
            n = len(self.waiting[0].prompt)
            if taken and (len(taken) + 1) * max(longest, n) > PREFILL_TOKENS:
                break
            longest = max(longest, n)
            request = self.waiting.popleft()
            self.slots[free[len(taken)]] = Slot(request)
            taken.append((free[len(taken)], request))
        return taken

    def record(self, slot: int, token: int) -> bool:
        """Slot ``slot``'s next id is ``token``; True (and the slot freed) when that ends it."""
        held = self.slots[slot]
        held.generated += 1
        params = held.request.sampling
        if token in params.stop_token_ids or held.generated >= params.max_new_tokens:
            self.slots[slot] = None
            return True
        return False

    def compact(self) -> list[tuple[int, int]]:
        """When nothing waits and the active slots fit a smaller bucket than their highest
        index needs: move the ones above it into the free slots below. The (src, dst) moves."""
        active = self.active()
        if self.waiting or not active:
            return []
        size = bucket(len(active), self.max_batch)
        if bucket(active[-1] + 1, self.max_batch) <= size:
            return []
        free = (i for i in range(size) if self.slots[i] is None)
        moves = [(src, next(free)) for src in active if src >= size]
        for src, dst in moves:
            self.slots[dst], self.slots[src] = self.slots[src], None
        return moves

    def shape(self) -> tuple[int, int]:
        """The decode step's (batch bucket, positions attention reads)."""
        active = self.active()
        longest = max(self.slots[i].position for i in active) + 1
        length = min(self.capacity, max(MIN_LENGTH_BUCKET, bucket(longest, self.capacity)))
        return bucket(active[-1] + 1, self.max_batch), length
