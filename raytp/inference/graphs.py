"""CUDA graphs of the decode step: one per (batch bucket, positions read, sampling kind),
captured at its first use and replayed after, TP collectives included.

A step function ``step(update)`` reads its inputs from static buffers and writes the
chosen ids into one; with ``update`` it also advances the buffers to the next step
(each slot's last id and position). Before a capture the step runs once eagerly on a
side stream without ``update`` (CUDA modules loaded, cuBLAS workspaces and NCCL
communicators made): it writes only what the real step writes again before reading
it (the new keys and values at each slot's position, the output ids), so it can run in
the middle of a generation. The capture itself runs nothing. Every graph shares one
memory pool: they are replayed one at a time and keep nothing between replays.

NCCL collectives are captured as kernels on the capturing stream (torch.distributed's
NCCL process group supports capture; the CuPy backend's side-stream ops are ordered by
events, which a capture follows). Every TP rank captures the same key at the same step:
they run the same scheduler. If a capture raises, one warning says why, no graph is
captured again, and the step runs eagerly.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Hashable

import torch

log = logging.getLogger(__name__)


class DecodeGraphs:
    """The captured decode steps of one cache on ``device``, by key."""

    def __init__(self, device: torch.device):
        self.device = device
        self.graphs: dict[Hashable, torch.cuda.CUDAGraph] = {}
        self.pool = None
        self.failed: str | None = None  # why a capture failed; then every step runs eager

    def run(self, key: Hashable, step: Callable[[bool], None]) -> bool:
        """``step(True)``: by replaying the graph of ``key`` (captured now if it is new), or
        eagerly after a failed capture. Returns whether a graph ran."""
        graph = self.graphs.get(key)
        if graph is None and self.failed is None:
            graph = self._capture(key, step)
        if graph is None:
            step(True)
            return False
        graph.replay()
        return True

    def _capture(self, key: Hashable, step: Callable[[bool], None]) -> torch.cuda.CUDAGraph | None:
        current = torch.cuda.current_stream(self.device)
        try:
            side = torch.cuda.Stream(self.device)
            side.wait_stream(current)
            with torch.cuda.stream(side):
                step(False)
            current.wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            if self.pool is None:
                self.pool = torch.cuda.graph_pool_handle()
            # thread_local: other threads (NCCL's watchdog, Ray's) may call CUDA meanwhile
            with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
                step(True)
        except Exception as e:  # noqa: BLE001 - any failure: decode eagerly instead
            self.failed = f"{type(e).__name__}: {e}"
            log.warning("CUDA graph capture of the decode step %s failed (%s); decoding runs eagerly",
                        key, self.failed)
            return None
        self.graphs[key] = graph
        log.debug("captured the decode step %s (%d graphs)", key, len(self.graphs))
        return graph

    def __len__(self) -> int:
        return len(self.graphs)
