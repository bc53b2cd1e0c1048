"""Where the ranks are when a phase stalls, and the report that names the stuck one.

Each rank answers :meth:`~actors.RankActor.where` from its "control" concurrency group,
a thread of its own, so the answer never queues behind a phase: the phase it is in and
the last collective it issued on each group (kind, sequence number, bytes, the layer
that issued it, whether it is blocked inside it). A rank that does not answer is
stopped, or hung outside Python.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import defaultdict
from collections.abc import Callable

import ray

from raytp.driver.launch import CONTROL, first_line

log = logging.getLogger(__name__)

PING_INTERVAL_S = 1.0  # a dead rank is seen within about two intervals of Ray knowing it


class HealthMonitor:
    """Pings every rank once a second from a driver thread, through the actors' "control"
    concurrency group (answered from a thread of the actor's own, so a ping never queues
    behind a phase). A rank whose actor Ray reports dead is recorded in ``dead`` and
    logged at once, naming the phase the driver had given it (``phase_of()``); the
    driver raises it as :class:`~raytp.driver.errors.RankDied` from the wait it is in,
    or from its next call. A rank that is alive but silent (stopped, hung) is left to the
    phase deadline, which names where every rank is."""

    def __init__(self, actors: list, phase_of: Callable[[], str], interval_s: float = PING_INTERVAL_S):
        self.actors, self.phase_of, self.interval_s = list(actors), phase_of, interval_s
        self.dead: dict[int, dict] = {}  # rank -> {"at": time.time(), "phase", "reason"}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="raytp-health", daemon=True)
        self._thread.start()

    def first_dead(self) -> tuple[int, dict] | None:
        """(rank, what was seen) of the lowest dead rank, or None."""
        return min(self.dead.items()) if self.dead else None

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        in_flight: dict[int, ray.ObjectRef] = {}  # one ping per rank at a time
        while not self._stop.wait(self.interval_s):
            for rank, actor in enumerate(self.actors):
                if rank not in self.dead and rank not in in_flight:
                    in_flight[rank] = actor.ping.options(concurrency_group=CONTROL).remote()
            ready, _ = ray.wait(list(in_flight.values()), num_returns=len(in_flight), timeout=0.5)
            for rank, ref in list(in_flight.items()):
                if ref in ready:
                    del in_flight[rank]
                    self._check(rank, ref)

    def _check(self, rank: int, ref) -> None:
        try:
            ray.get(ref)
        except ray.exceptions.RayActorError as e:
            self.dead[rank] = {"at": time.time(), "phase": self.phase_of(), "reason": first_line(e)}
            log.error("rank %d's actor died during %s: %s", rank, self.dead[rank]["phase"],
                      self.dead[rank]["reason"])
        except ray.exceptions.RayError:  # noqa: S110 - anything else is the phases' business
            pass


def probe(actors: list, timeout_s: float = 5.0) -> list[dict | str]:
    """Every rank's ``where()``, or "dead" / "no answer" for the ranks that give none."""
    refs = [a.where.options(concurrency_group=CONTROL).remote() for a in actors]
    ready, _ = ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
    answers = []
    for ref in refs:
        if ref not in ready:
            answers.append("no answer")
            continue
        try:
            answers.append(ray.get(ref))
        except ray.exceptions.RayActorError:
            answers.append("dead")
        except ray.exceptions.RayError as e:
            answers.append(f"error ({type(e).__name__})")
    return answers


def _at(where: dict) -> tuple | None:
    """The collective a rank is at: the most recent one it issued on any group."""
    calls = [c for c in where.get("collectives", {}).values() if c]
    if not calls:
        return None
    c = min(calls, key=lambda c: c["seconds"])
    return (c["group"], c["kind"], c["seq"], c["tag"], c["nbytes"], c["blocked"])


def report(answers: list[dict | str]) -> str:
    """One clause per kind of rank: the silent ones, then each collective ranks are in,
    with its sequence number, the layer that issued it and its bytes, e.g. "rank 1 does
    not answer (stopped, or hung outside Python); ranks 0, 2 wait in tp all_reduce #12
    (layers.0.mlp.fc_out, 64.0 KiB) during train_step"."""
    silent = defaultdict(list)
    places = defaultdict(list)
    for rank, answer in enumerate(answers):
        if isinstance(answer, str):
            silent[answer].append(rank)
            continue
        at = _at(answer)
        if at is None:
            places[(None, "", answer.get("phase"))].append(rank)
        else:
            group, kind, seq, tag, nbytes, blocked = at
            detail = ", ".join(x for x in (tag, _size(nbytes)) if x)
            places[(blocked, f"{group} {kind} #{seq} ({detail})", answer.get("phase"))].append(rank)
    parts = [_silent(what, ranks) for what, ranks in silent.items()]
    for (blocked, where, phase), ranks in sorted(places.items(), key=lambda kv: kv[1][0]):
        if blocked is None:
            verb = "has" if len(ranks) == 1 else "have"
            parts.append(f"{_ranks(ranks)} {verb} issued no collective yet")
        else:
            one = len(ranks) == 1
            verb = ("waits in" if one else "wait in") if blocked else "last issued"
            parts.append(f"{_ranks(ranks)} {verb} {where}")
        parts[-1] += f" during {phase}" if phase else ""
    return "; ".join(parts)


def _size(nbytes: int | None) -> str:
    if nbytes is None:
        return ""
    if nbytes < 1024:
        return f"{nbytes} B"
    return f"{nbytes / 1024:.1f} KiB" if nbytes < 1 << 20 else f"{nbytes / (1 << 20):.1f} MiB"
    for unit in ("B", "KiB", "MiB"):
        if nbytes < 1024 or unit == "MiB":
            return f"{nbytes} B" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1024
    return ""


def _silent(what: str, ranks: list[int]) -> str:
    one = len(ranks) == 1
    if what == "no answer":
        return f"{_ranks(ranks)} {'does' if one else 'do'} not answer (stopped, or hung outside Python)"
    return f"{_ranks(ranks)} {'is' if one else 'are'} {what}"


def _ranks(ranks: list[int]) -> str:
    return f"rank {ranks[0]}" if len(ranks) == 1 else "ranks " + ", ".join(map(str, ranks))


def abort(actors: list, timeout_s: float = 5.0) -> None:
    """Ask the ranks that still answer to abort their communicators (best effort)."""
    refs = []
    for a in actors:
        try:
            refs.append(a.abort.options(concurrency_group=CONTROL).remote())
        except Exception:  # noqa: BLE001 - a dead actor takes no calls
            continue
    if refs:
        ray.wait(refs, num_returns=len(refs), timeout=timeout_s)


def diagnose(actors: list, phase: str) -> tuple[str, list[int]]:
    """The report of where every rank is (logged), and the ranks that gave no answer."""
    start = time.monotonic()
    answers = probe(actors)
    text = report(answers)
    log.error("%s stalled: %s (probed in %.1fs)", phase, text, time.monotonic() - start)
    return text, [rank for rank, answer in enumerate(answers) if isinstance(answer, str)]
