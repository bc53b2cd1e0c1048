"""The decoding engine of one rank: prefill and decode steps over a :class:`SlotCache`,
driven by a :class:`Scheduler`, each step's ids chosen on the device.

:meth:`GenerationEngine.steps` admits waiting requests (prefill, a few prompts at a
time, padded to their longest), then runs decode steps of every active slot, up to
``max_steps``, and returns the (prompt index, id) events they decided. A decode step
reads its inputs from static per-slot buffers (each slot's last id, position and
sampling parameters) and leaves the next step's there, so that on CUDA it is one graph
replay (:class:`DecodeGraphs`) and one small device-to-host copy of the chosen ids.
Call it under ``torch.inference_mode`` with the model in eval mode and without sequence
parallelism (:class:`raytp.inference.Generator` does).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import torch

from raytp.inference.cache import CacheShape, Prefill, SlotCache
from raytp.inference.graphs import DecodeGraphs
from raytp.inference.sampling import Rows, VocabShard, choose, kind_of
from raytp.inference.scheduler import Request, Scheduler


class StepBuffers:
    """The decode step's per-slot inputs and output, static (a graph reads and writes them
    in place), each (max_batch,): ``ids`` (max_batch, 1) the last id chosen, ``positions``
    where it sits, the sampling fields of :class:`Rows`, ``out`` the id a step chose."""

    FIELDS = ("ids", "positions", "temperature", "top_k", "top_p", "key", "out")

    def __init__(self, max_batch: int, device: torch.device):
        long = {"dtype": torch.int64, "device": device}
        self.ids, self.positions = torch.zeros(max_batch, 1, **long), torch.zeros(max_batch, **long)
        self.temperature = torch.zeros(max_batch, dtype=torch.float32, device=device)
        self.top_k, self.key, self.out = torch.ones(max_batch, **long), torch.zeros(max_batch, **long), \
            torch.zeros(max_batch, **long)
        self.top_p = torch.full((max_batch,), float("inf"), device=device)
        self.host = torch.zeros(max_batch, dtype=torch.int64, pin_memory=device.type == "cuda")

    def rows(self, b: int) -> Rows:
        """The sampling rows of slots [0, b), choosing the id after each slot's position."""
        return Rows(self.temperature[:b], self.top_k[:b], self.top_p[:b], self.key[:b],
                    self.positions[:b] + 1)

    def admit(self, slots: torch.Tensor, ids: torch.Tensor, positions: torch.Tensor, rows: Rows) -> None:
        """Slots ``slots`` (n,) now hold sequences whose last ids ``ids`` sit at ``positions``."""
        self.ids[slots, 0], self.positions[slots] = ids, positions
        for name in ("temperature", "top_k", "top_p", "key"):
            getattr(self, name)[slots] = getattr(rows, name)

    def move(self, src: int, dst: int) -> None:
        for name in self.FIELDS:
            tensor = getattr(self, name)
            tensor[dst] = tensor[src]

    def read(self, b: int) -> list[int]:
        """The ids the last step chose for slots [0, b): one device-to-host copy."""
        if self.out.device.type != "cuda":
            return self.out[:b].tolist()
        self.host[:b].copy_(self.out[:b], non_blocking=True)
        torch.cuda.current_stream(self.out.device).synchronize()
        return self.host[:b].tolist()


class GenerationEngine:
    """Continuous-batching generation with ``model`` (a raytp GPT) on one rank of ``mesh``,
    over a cache of ``shape``; decode steps captured as CUDA graphs when ``cuda_graphs``
    (on CUDA only). ``stats`` are those of the generation since :meth:`start`."""

    def __init__(self, model, mesh, shape: CacheShape, cuda_graphs: bool = True):
        self.model, self.device, self.shape = model, mesh.device, shape
        config, head = model.config, model.lm_head
        self.cache = SlotCache(shape, self.device)
        self.buffers = StepBuffers(shape.max_batch, self.device)
        self.shard = VocabShard(head.vocab_start, head.rows_per_rank, config.vocab_size,
                                mesh.tp_comm if mesh.tp_size > 1 else None)
        self.graphs = DecodeGraphs(self.device) if cuda_graphs and self.device.type == "cuda" else None
        self.max_position = min(shape.max_len, config.max_seq_len) - 1  # garbage rows stay in range
        self.scheduler = Scheduler(shape.max_batch, shape.capacity)
        self.start()

    def start(self, cuda_graphs: bool | None = None) -> None:
        """A new generation: no requests, fresh stats; ``cuda_graphs=False`` decodes eagerly."""
        self.scheduler = Scheduler(self.shape.max_batch, self.shape.capacity)
        self.use_graphs = self.graphs is not None and cuda_graphs is not False
        self.stats = {"decode_steps": 0, "decode_s": 0.0, "prefill_s": 0.0, "active_slot_steps": 0,
                      "graph_steps": 0, "prefills": 0, "slot_moves": 0}

    def steps(self, requests: Sequence[Request], max_steps: int, cancel: Sequence[int] = ()
              ) -> dict[str, Any]:
        """Drop the requests of ``cancel`` (their slots are free for the next step), queue
        ``requests``; prefill and decode until ``max_steps`` decode steps ran or
        nothing is left. Returns ``events`` [(prompt index, id)] in the order decided,
        ``first_token_at`` {prompt index: time.time() of its first id}, ``idle`` and
        ``stats`` (of the generation so far)."""
        self.scheduler.cancel(cancel)
        self.scheduler.add(requests)
        events: list[tuple[int, int]] = []
        first: dict[int, float] = {}
        decoded = 0
        while decoded < max_steps and not self.scheduler.idle:
            admitted = self.scheduler.admit()
            if admitted:
                self._prefill(admitted, events, first)
                continue
            self._decode_step(events)
            decoded += 1
        return {"events": events, "first_token_at": first, "idle": self.scheduler.idle,
                "stats": dict(self.stats)}

    def _prefill(self, admitted: list[tuple[int, Request]], events, first) -> None:
        t0 = time.perf_counter()
        requests = [r for _, r in admitted]
        lengths = [len(r.prompt) for r in requests]
        ids = torch.zeros(len(requests), max(lengths), dtype=torch.int64)
        for row, r in enumerate(requests):
            ids[row, :len(r.prompt)] = torch.tensor(r.prompt)
        ids, length = ids.to(self.device), torch.tensor(lengths).to(self.device)
        positions = torch.arange(ids.shape[1], device=self.device).expand_as(ids)
        slots = torch.tensor([s for s, _ in admitted]).to(self.device)
        self.cache.step = Prefill(slots, positions < length[:, None])
        logits = self.model.forward_at(ids, positions, self.cache.layers, last=length - 1)  # (n, V_r)
        params = [r.sampling for r in requests]
        rows = Rows.of(params, [r.key for r in requests], lengths, self.shard.vocab_size, self.device)
        tokens = choose(logits, rows, kind_of(params, self.shard.vocab_size), self.shard)
        self.buffers.admit(slots, tokens, length, rows)
        now = time.time()
        for (slot, request), token in zip(admitted, tokens.tolist(), strict=True):
            events.append((request.index, token))
            first[request.index] = now
            self.scheduler.record(slot, token)
        self.stats["prefill_s"] += time.perf_counter() - t0
        self.stats["prefills"] += 1

    def _decode_step(self, events) -> None:
        for src, dst in self.scheduler.compact():
            self.cache.move(src, dst)
            self.buffers.move(src, dst)
            self.stats["slot_moves"] += 1
        active = self.scheduler.active()
        b, length = self.scheduler.shape()
        params = {self.scheduler.slots[i].request.sampling for i in active}
        kind = kind_of(params, self.shard.vocab_size)
        step = lambda update: self._decode(b, length, kind, update)
        t0 = time.perf_counter()
        if self.use_graphs:
            self.stats["graph_steps"] += self.graphs.run((b, length, kind), step)
        else:
            step(True)
        tokens = self.buffers.read(b)
        self.stats["decode_s"] += time.perf_counter() - t0
        self.stats["decode_steps"] += 1
        self.stats["active_slot_steps"] += len(active)
        for slot in active:
            events.append((self.scheduler.slots[slot].request.index, tokens[slot]))
            self.scheduler.record(slot, tokens[slot])

    def _decode(self, b: int, length: int, kind, update: bool) -> None:
        """One decode step of slots [0, b) reading ``length`` positions: device work only."""
        buffers = self.buffers
        positions = buffers.positions[:b]
        self.cache.step = self.cache.decode_step(positions, length)
        logits = self.model.forward_at(buffers.ids[:b], positions[:, None], self.cache.layers)[:, 0]
        tokens = choose(logits, buffers.rows(b), kind, self.shard)  # (b,)
        buffers.out[:b].copy_(tokens)
        if update:
            buffers.ids[:b, 0].copy_(tokens)
            buffers.positions[:b].copy_((positions + 1).clamp_(max=self.max_position))
