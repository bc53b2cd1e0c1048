"""``Batcher``: one continuous batch on a built TPCluster that requests from many
clients join while it decodes, for a server (:mod:`raytp.serve`).

A thread drives the ranks as :func:`raytp.driver.generation.stream` does (every rank's
``generate_steps``, two calls in flight), but never starts a new generation: each call
carries the requests submitted since the last one, which the ranks queue behind those
decoding, and the indices of requests to drop (a client gone, a stop string reached),
whose slots the ranks free before their next step. Each request gets an index of its
own; its draws stay keyed by its index in its client's call (``Request.key_index``), so
a seeded request gives what ``cluster.generate`` of that call gives.

Events go to each request's ``sink``, called on the batcher's thread: ``("token",
choice, id)``, ``("done", choice, None)`` after its last id (a stop id, or its
``max_new_tokens``), and ``("error", choice, RanksLost)`` when the ranks failed under
it. After a failure the batcher rebuilds the ranks (:meth:`TPCluster.recover`);
requests submitted meanwhile wait for the new ranks; if the rebuild fails they get
``RanksLost`` too, and the next submission tries again.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from raytp.driver.pending import Pending
from raytp.inference import Request
from raytp.inference.generator import STEPS_PER_CALL

log = logging.getLogger(__name__)

Sink = Callable[[tuple[str, int, Any]], None]
COUNTED = ("decode_steps", "active_slot_steps", "prefills", "decode_s", "prefill_s")


class RanksLost(RuntimeError):
    """The ranks failed under a request (or could not be rebuilt); ``retry_after_s``: when
    to try again."""

    def __init__(self, message: str, retry_after_s: float):
        super().__init__(message)
        self.retry_after_s = retry_after_s


@dataclasses.dataclass
class Live:
    """A request the ranks hold: whose it is, and the ids they chose for it so far."""

    request: Request
    choice: int
    group: int  # its DP group
    sink: Sink
    generated: int = 0


class Batcher:
    """The continuous batch of ``cluster`` (built, generative), driven from a thread of
    its own (see the module docstring). ``rebuild_retry_s`` is the hint a failed request
    gets for when to retry; ``steps_per_call`` decode steps run per call."""

    def __init__(self, cluster, *, steps_per_call: int = STEPS_PER_CALL, rebuild_retry_s: float = 5.0):
        if cluster.generation.info is None:
            raise ValueError("serving needs a raytp GPT model (raytp.models.pretrained(path))")
        self.cluster, self.steps_per_call, self.retry_s = cluster, steps_per_call, rebuild_retry_s
        self._cond = threading.Condition()
        self._queue: list[Live] = []  # submitted, not yet sent to the ranks
        self._live: dict[int, Live] = {}  # sent, not done, by index
        self._cancel: list[int] = []
        self._next_index = 0
        self._closed = False
        self._down: RanksLost | None = None  # the last rebuild failed
        self.counts = dict.fromkeys(COUNTED, 0) | {"tokens": 0, "requests": 0, "rebuilds": 0}
        self._seen = dict.fromkeys(COUNTED, 0)  # rank 0's counters of its current generation
        self._thread = threading.Thread(target=self._run, name="raytp-batcher", daemon=True)
        self.error: BaseException | None = None  # what ended the thread, if anything did
        self._thread.start()

    @property
    def info(self) -> dict[str, Any]:
        """What requests are checked against: ``vocab_size``, ``max_seq_len``, ``max_len``."""
        return self.cluster.generation.info

    @property
    def ready(self) -> bool:
        """Whether the ranks are up (False while rebuilding or after a failed rebuild)."""
        return self._thread.is_alive() and self._down is None and bool(self.cluster.actors)

    def submit(self, requests: Sequence[Request], sink: Sink) -> list[int]:
        """Queue ``requests`` (checked, e.g. by :func:`raytp.inference.make_requests`; choice
        i is ``requests[i].index``); their indices in the batch, for :meth:`cancel`."""
        with self._cond:
            if self._closed or not self._thread.is_alive():
                raise RuntimeError("the batcher is closed")
            if self._down is not None and not self._queue:
                self._down = None  # try a rebuild for these
            live = []
            for r in requests:
                index, self._next_index = self._next_index, self._next_index + 1
                live.append(Live(dataclasses.replace(r, index=index, key_index=r.index), r.index, 0, sink))
            self._queue.extend(live)
            self.counts["requests"] += len(live)
            self._cond.notify()
        return [x.request.index for x in live]

    def cancel(self, indices: Sequence[int]) -> None:
        """Stop the requests of ``indices``: no more events; the ranks free their slots."""
        with self._cond:
            for index in indices:
                if self._live.pop(index, None) is not None:
                    self._cancel.append(index)
            drop = set(indices)
            self._queue = [x for x in self._queue if x.request.index not in drop]
            self._cond.notify()

    def stats(self) -> dict[str, Any]:
        """Since the start: requests, tokens, decode steps and the mean active slots per
        decode step (rank 0's), prefills, rebuilds; and what is queued and live now."""
        with self._cond:
            counts = dict(self.counts)
            counts.update(queued=len(self._queue), live=len(self._live), ready=self.ready)
        steps = counts["decode_steps"]
        counts["mean_active_slots"] = counts["active_slot_steps"] / steps if steps else 0.0
        return counts

    def close(self, timeout_s: float = 10.0) -> None:
        """Stop the thread (after the calls in flight) and fail what is left."""
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join(timeout_s)
        self._fail(list(self._queue) + list(self._live.values()), RanksLost("the server is shutting down", 0))

    # -- the thread --------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while self._wait_for_work():
                try:
                    self._serve()
                except Exception as e:  # the ranks failed: fail what they held, rebuild them
                    self._recover(e)
        except BaseException as e:  # a bug here: check_health reports it, Serve replaces the replica
            self.error = e
            log.exception("the batcher's thread ended")
            raise

    def _wait_for_work(self) -> bool:
        with self._cond:
            while not self._closed and not (self._queue and self._down is None) and not self._live:
                self._cond.wait()
            return not self._closed

    def _serve(self) -> None:
        """Calls, two in flight, until nothing is queued or live (a failure raises; the
        call left in flight is dropped with the ranks)."""
        in_flight: list[Pending] = []
        while True:
            while len(in_flight) < 2 and self._busy():
                in_flight.append(self._submit_call())
            if not in_flight:
                return
            self._dispatch(in_flight.pop(0).result())

    def _busy(self) -> bool:
        with self._cond:
            return not self._closed and (bool(self._queue) or bool(self._live) or bool(self._cancel))

    def _submit_call(self) -> Pending:
        with self._cond:
            new, self._queue = self._queue, []
            cancel, self._cancel = self._cancel, []
            for x in new:
                x.group = min(range(self.cluster.dp), key=self._load)
                self._live[x.request.index] = x
        tp, group = self.cluster.tp, self.cluster.group
        args = [([x.request for x in new if x.group == rank // tp], self.steps_per_call)
                for rank in range(self.cluster.world_size)]
        return Pending(group, group.call("generate_steps", args, phase="serve", cancel=cancel), "serve")

    def _load(self, dp_group: int) -> int:
        return sum(1 for x in self._live.values() if x.group == dp_group)

    def _dispatch(self, results: list[dict]) -> None:
        leaders = results[:: self.cluster.tp]
        self._count(leaders[0])
        for result in leaders:
            for index, token in result["events"]:
                with self._cond:
                    x = self._live.get(index)
                    if x is None:  # cancelled while its call ran
                        continue
                    x.generated += 1
                    params = x.request.sampling
                    done = token in params.stop_token_ids or x.generated >= params.max_new_tokens
                    if done:  # the ranks freed its slot as they chose this id (Scheduler.record)
                        del self._live[index]
                    self.counts["tokens"] += 1
                x.sink(("token", x.choice, token))
                if done:
                    x.sink(("done", x.choice, None))

    def _count(self, result: dict) -> None:
        """Add rank 0's counters since the last call; they restart when its generation
        ends (the ranks were idle)."""
        ranks = result["stats"] or {}
        with self._cond:
            for name in COUNTED:
                self.counts[name] += ranks.get(name, 0) - self._seen[name]
            idle = result["idle"]
            self._seen = {k: 0 if idle else ranks.get(k, 0) for k in COUNTED}

    def _recover(self, error: Exception) -> None:
        first = str(error).splitlines()[0]
        log.error("serving: the ranks failed (%s); failing their requests and rebuilding", first)
        with self._cond:
            lost, self._live, self._cancel = list(self._live.values()), {}, []
        self._fail(lost, RanksLost(f"the model's ranks failed ({first}); they are being rebuilt",
                                   self.retry_s))
        if self._closed:  # closing tore the ranks down under a call: nothing to rebuild
            return
        started = time.monotonic()
        try:
            self.cluster.recover()
        except Exception as e:
            down = RanksLost(f"the model's ranks failed and could not be rebuilt ({e}); the next "
                             "request tries again", self.retry_s)
            with self._cond:
                waiting, self._queue, self._down = self._queue, [], down
            self._fail(waiting, down)
            return
        with self._cond:
            self._seen = dict.fromkeys(COUNTED, 0)
            self.counts["rebuilds"] += 1
        log.warning("serving: ranks rebuilt in %.1fs", time.monotonic() - started)

    @staticmethod
    def _fail(lost: list[Live], error: RanksLost) -> None:
        for x in lost:
            x.sink(("error", x.choice, error))
