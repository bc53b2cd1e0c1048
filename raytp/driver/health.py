"""Where the ranks are when a phase stalls, and the report that names the stuck one.

Each rank answers :meth:`~actors.RankActor.where` from its "control" concurrency group,
a thread of its own, so the answer never queues behind a phase: the phase it is in and
the last collective it issued on each group (kind, sequence number, bytes, the layer
that issued it, whether it is blocked inside it). A rank that does not answer is
stopped, or hung outside Python.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict

import ray

from raytp.driver.launch import CONTROL

log = logging.getLogger(__name__)


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
    return (c["group"], c["kind"], c["seq"], c["tag"], c["blocked"])


def report(answers: list[dict | str]) -> str:
    """One sentence per kind of rank: the silent ones, then each collective ranks are in,
    e.g. "rank 1 does not answer (stopped, or hung outside Python); rank 0 waits in
    tp all_reduce #12 (layers.0.mlp.fc_out)"."""
    silent = defaultdict(list)
    places = defaultdict(list)
    for rank, answer in enumerate(answers):
        if isinstance(answer, str):
            silent[answer].append(rank)
            continue
        at = _at(answer)
        if at is None:
            places[("no collective yet", answer.get("phase"))].append(rank)
        else:
            group, kind, seq, tag, blocked = at
            state = "waits in" if blocked else "last issued"
            places[(f"{state} {group} {kind} #{seq}" + (f" ({tag})" if tag else ""),
                     answer.get("phase"))].append(rank)
    parts = [_silent(what, ranks) for what, ranks in silent.items()]
    for (where, phase), ranks in sorted(places.items(), key=lambda kv: kv[1][0]):
        parts.append(f"{_ranks(ranks)} {where}" + (f" during {phase}" if phase else ""))
    return "; ".join(parts)


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
