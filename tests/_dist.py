"""Run a function on every rank of a gloo world of CPU processes, without Ray.

Worlds are started once per size and reused by every test (starting processes that
import torch costs seconds on a 2-core machine). A job is a module-level function
and its arguments; it runs on all ranks and the per-rank results come back in rank
order. A rank that raises fails the test with its traceback; a world that stops
answering is torn down and started afresh for the next test.
"""

from __future__ import annotations

import datetime
import multiprocessing as mp
import os
import queue
import socket
import traceback

JOB_TIMEOUT_S = 180
GRACE_S = 10  # how long the other ranks may take to report after one failed


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, backend, inbox, outbox):
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    if backend == "nccl":  # one GPU per rank, on the GPU host
        torch.cuda.set_device(rank)
    elif backend == "gloo-cuda":  # gloo's CUDA collectives, ranks sharing the GPUs there are
        torch.cuda.set_device(rank % torch.cuda.device_count())
        backend = "gloo"
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=60))
    while (job := inbox.get()) is not None:
        fn, args = job
        try:
            outbox.put((rank, True, fn(*args)))
        except BaseException:  # noqa: BLE001 - the test reports it
            outbox.put((rank, False, traceback.format_exc()))
    dist.destroy_process_group()


class World:
    def __init__(self, size: int, backend: str = "gloo"):
        ctx = mp.get_context("spawn")
        self.size = size
        port = _free_port()
        self.outbox = ctx.Queue()
        self.inboxes = [ctx.Queue() for _ in range(size)]
        self.procs = [ctx.Process(target=_worker, args=(r, size, port, backend, self.inboxes[r], self.outbox),
                                  daemon=True) for r in range(size)]
        for p in self.procs:
            p.start()

    def run(self, fn, *args):
        for inbox in self.inboxes:
            inbox.put((fn, args))
        results, failures = [None] * self.size, {}
        deadline = JOB_TIMEOUT_S
        for _ in range(self.size):
            try:
                rank, ok, value = self.outbox.get(timeout=deadline)
            except queue.Empty:
                self.close(force=True)
                missing = [r for r in range(self.size) if results[r] is None and r not in failures]
                if failures:
                    break
                raise TimeoutError(f"{fn.__name__}: ranks {missing} did not finish in time") from None
            if ok:
                results[rank] = value
            else:
                failures[rank] = value
                deadline = GRACE_S
        if failures:
            self.close(force=True)
            report = "\n".join(f"--- rank {r} ---\n{tb}" for r, tb in sorted(failures.items()))
            raise AssertionError(f"{fn.__name__} failed on ranks {sorted(failures)}:\n{report}")
        return results

    @property
    def alive(self) -> bool:
        return all(p.is_alive() for p in self.procs)

    def close(self, force=False):
        if not force:
            for inbox in self.inboxes:
                inbox.put(None)
            for p in self.procs:
                p.join(timeout=10)
        for p in self.procs:
            if p.is_alive():
                p.kill()
                p.join()


_worlds: dict[tuple[int, str], World] = {}


def run(world_size: int, fn, *args, backend: str = "gloo"):
    """Run ``fn(*args)`` on every rank of a ``world_size`` world of ``backend`` ("gloo" on
    CPU, "nccl" with one GPU per rank, "gloo-cuda" with ranks sharing the GPUs); return
    the results in rank order."""
    world = _worlds.get((world_size, backend))
    if world is None or not world.alive:
        world = _worlds[(world_size, backend)] = World(world_size, backend)
    return world.run(fn, *args)


def shutdown():
    while _worlds:
        _worlds.popitem()[1].close()
