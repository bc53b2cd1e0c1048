"""``cluster.generate`` and ``cluster.stream``: prompts checked on the driver, split over
the DP groups, and every rank's :meth:`~raytp.engine.RankEngine.generate_steps` called
until each prompt is done.

The prompts of a call go to the ranks with the first call (prompt i to DP group i % dp);
each call then runs up to :data:`~raytp.inference.generator.STEPS_PER_CALL` decode steps
on every rank and returns the (prompt index, id) events decided meanwhile, read from
each group's first TP rank (the others decide the same). Two calls are kept in flight,
so the ranks never wait for the driver's round trip. ``stream`` yields the events as
each call returns; ``generate`` collects them.

:func:`generation_stats` describes the last generation: decode steps and their time on
rank 0 (each step timed from its launch to its ids on the host), prefill time, the mean
number of active slots per decode step, each prompt's time to its first id (from the
call to when a rank chose it, by the ranks' wall clocks), tokens, wall time, whether
CUDA graphs ran, and the cache's sizes.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

from raytp.driver.pending import Pending
from raytp.inference import SamplingParams, make_requests
from raytp.inference.generator import SIZES, STEPS_PER_CALL


class Generation:
    """The driver's record of what the built ranks generate with (``info``: rank 0's
    :meth:`raytp.inference.Generator.describe`, None when the model does not generate)
    and of the last generation's stats."""

    def __init__(self, info: dict[str, Any] | None):
        self.info = info
        self.stats: dict[str, Any] | None = None

    @property
    def sizes(self) -> dict[str, Any] | None:
        """The build's report of the cache: ``max_batch``, ``max_len``, ``kv_cache_bytes``."""
        return None if self.info is None else {k: self.info[k] for k in SIZES}


def stream(cluster, prompts, sampling: SamplingParams, *, cuda_graphs: bool | None = None
           ) -> Iterator[tuple[int, int]]:
    """``(prompt_index, token_id)`` as the ranks decide them; exactly what :func:`generate`
    returns, in the order decided. ``prompts`` and ``sampling`` are checked here, before
    any rank work (:func:`raytp.inference.make_requests`: a ValueError names the prompt)."""
    return _run(cluster, *_requests(cluster, prompts, sampling, "stream"), cuda_graphs)


def generate(cluster, prompts, sampling: SamplingParams, *, cuda_graphs: bool | None = None
             ) -> list[list[int]]:
    """Each prompt's new ids, in order: ``prompts`` is a list of token-id lists of any
    lengths (or a 2-D array); a stop id ends its sequence and is its last id.
    ``cuda_graphs=False`` decodes eagerly (None: the build's setting)."""
    state, requests = _requests(cluster, prompts, sampling, "generate")
    out: list[list[int]] = [[] for _ in requests]
    for index, token in _run(cluster, state, requests, cuda_graphs):
        out[index].append(token)
    return out


def _requests(cluster, prompts, sampling, phase: str):
    """The generation record and the checked requests of ``prompts``."""
    if not cluster.built:
        raise RuntimeError(f"{phase}() before build(): call cluster.build(model, ...) first")
    cluster.group.check_alive()
    state = cluster.generation
    if state.info is None:
        raise ValueError(f"{phase}() needs a raytp GPT model (a GPTConfig or raytp.models.pretrained(path)); "
                         "these ranks were built from another model")
    info = state.info
    return state, make_requests(prompts, sampling, vocab_size=info["vocab_size"],
                                max_seq_len=info["max_seq_len"], max_len=info["max_len"])


def generation_stats(cluster) -> dict[str, Any]:
    """The last generate / stream (see the module docstring); {} before the first."""
    stats = cluster.generation.stats if cluster.built else None
    return dict(stats) if stats else {}


def _run(cluster, state: Generation, requests, cuda_graphs) -> Iterator[tuple[int, int]]:
    started = time.time()
    tp, dp = cluster.tp, cluster.dp
    groups = [[r for r in requests if r.index % dp == d] for d in range(dp)]
    need = (max(map(len, groups)), max((r.positions for r in requests), default=1))
    stats = state.stats = _empty_stats(len(requests))

    def submit(first: bool) -> Pending:
        args = [(groups[rank // tp] if first else [], STEPS_PER_CALL) for rank in range(tp * dp)]
        options = {"start": True, "cuda_graphs": cuda_graphs, "need": need} if first else {}
        return Pending(cluster.group, cluster.group.call("generate_steps", args, phase="generate", **options),
                       "generate")

    if not requests:
        return
    in_flight, done = [submit(True), submit(False)], False
    try:
        while not done:
            leaders = in_flight.pop(0).result()[::tp]
            for group, result in enumerate(leaders):
                _account(stats, result, started, rank0=group == 0)
                yield from result["events"]
            done = all(r["idle"] for r in leaders)
            if not done:
                in_flight.append(submit(False))
        for pending in in_flight:
            pending.result()  # the ranks are idle: it returns at once, with no events
    except GeneratorExit:  # the caller stopped reading: end the generation on the ranks
        for pending in in_flight:
            pending.result()
        cluster.group.wait(cluster.group.call("generate_steps", [([], 0)] * (tp * dp), phase="generate",
                                              start=True), "generate")
        raise
    finally:
        stats["wall_s"] = time.time() - started


def _empty_stats(n: int) -> dict[str, Any]:
    return {"decode_steps": 0, "decode_s": 0.0, "prefill_s": 0.0, "mean_active_slots": 0.0,
            "first_token_s": [None] * n, "tokens": 0, "wall_s": 0.0, "cuda_graphs": False,
            "max_batch": None, "max_len": None, "kv_cache_bytes": None}


def _account(stats: dict[str, Any], result: dict[str, Any], started: float, rank0: bool) -> None:
    """Add one DP group's result of a call; the step counts and times are rank 0's (the
    generation's so far on that rank)."""
    stats["tokens"] += len(result["events"])
    for index, at in result["first_token_at"].items():
        stats["first_token_s"][index] = at - started
    ranks = result["stats"]
    if not rank0 or ranks is None:
        return
    steps = ranks["decode_steps"]
    stats.update(decode_steps=steps, decode_s=ranks["decode_s"], prefill_s=ranks["prefill_s"],
                 mean_active_slots=ranks["active_slot_steps"] / steps if steps else 0.0,
                 cuda_graphs=ranks["graph_steps"] > 0)
    if result["sizes"] is not None:
        stats.update(result["sizes"])
