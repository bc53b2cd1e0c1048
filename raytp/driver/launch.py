"""Bringing up the ranks: connect to Ray, reserve a placement group, start one actor
per rank, order them, and join them through their collective backend."""

from __future__ import annotations

import contextlib
import logging
import os
import time

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from actors import RankActor
from raytp.comm.backends import get_backend
from raytp.driver.address import check_reachable
from raytp.driver.errors import ClusterResourceError, PhaseTimeout, RankDied, RankError

log = logging.getLogger(__name__)

CPU_PER_CPU_RANK = 0.01  # CPU ranks share cores: a 2-core machine runs 4 of them
CONTROL = "control"  # the rank actors' concurrency group for health checks


def connect(address: str | None) -> bool:
    """Connect to a running Ray cluster (``address``, ``RAY_ADDRESS``, or the one this
    process is already in, as inside a ``ray job submit`` entrypoint), or start an
    embedded local one. Returns True when this call started Ray. An address that does
    not answer fails within seconds (see :mod:`raytp.driver.address`)."""
    if address:
        check_reachable(address)
    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        check_reachable(address)
        log.info("connecting to the Ray cluster at %s", address)
        ray.init(address=address, log_to_driver=True)
        return False
    log.info("no Ray cluster given: starting an embedded local one")
    ray.init(include_dashboard=False, log_to_driver=True,
             runtime_env={"env_vars": _inherited_env()})
    return True


def _inherited_env() -> dict[str, str]:
    # Keep NVLink multicast off in the ranks too when the driver has it off.
    keys = ("NCCL_NVLS_ENABLE", "TORCH_SYMM_MEM_DISABLE_MULTICAST", "NVSHMEM_DISABLE_NVLS")
    return {k: os.environ[k] for k in keys if k in os.environ}


def check_backend(name: str, device: str) -> str:
    """The registered backend ``name`` ("auto": torch's) can run on ``device``; its name."""
    backend = get_backend(name)
    backend.check(device)
    return backend.name if name == "auto" else name


def resolve_device(device: str, world_size: int) -> str:
    """'cuda' or 'cpu'; 'auto' picks CUDA when the cluster has a GPU for every rank."""
    gpus = int(ray.cluster_resources().get("GPU", 0))
    if device == "auto":
        device = "cuda" if gpus >= world_size else "cpu"
        log.info("device='auto': %s (%d GPUs in the cluster for %d ranks)", device, gpus, world_size)
    if device not in ("cuda", "cpu"):
        raise ValueError(f"device={device!r} must be 'auto', 'cuda' or 'cpu'")
    if device == "cuda" and gpus < world_size:
        raise ClusterResourceError(f"device='cuda' needs {world_size} GPUs; the cluster has {gpus}")
    return device


def reserve(tp: int, dp: int, device: str, timeout_s: float):
    """One bundle per TP group, so that a TP group never spans nodes."""
    per_rank = {"GPU": 1.0, "CPU": 1.0} if device == "cuda" else {"CPU": CPU_PER_CPU_RANK}
    bundles = [{k: v * tp for k, v in per_rank.items()} for _ in range(dp)]
    pg = placement_group(bundles, strategy="PACK")
    if not pg.wait(timeout_seconds=timeout_s):
        remove_placement_group(pg)
        raise ClusterResourceError(
            f"could not place tp={tp} x dp={dp} ranks ({dp} bundles of {bundles[0]}) within "
            f"{timeout_s:g}s; the cluster has {ray.available_resources()} available of "
            f"{ray.cluster_resources()}")
    return pg


def start_actors(pg, tp: int, dp: int, device: str, log_level: int, timeout_s: float) -> list:
    """The rank actors and their node infos, in rank order (see :func:`rank_order`)."""
    # the "control" group answers ping(), where() and abort() from its own thread while a
    # phase runs
    cls = ray.remote(concurrency_groups={CONTROL: 2})(RankActor)
    handles = [
        cls.options(
            num_gpus=1 if device == "cuda" else 0,
            num_cpus=1 if device == "cuda" else CPU_PER_CPU_RANK,
            scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=d),
        ).remote(d, slot, log_level)
        for d in range(dp) for slot in range(tp)
    ]
    infos = wait_all([h.node_info.remote() for h in handles], "start", timeout_s)
    order = rank_order(infos, tp)
    return [handles[i] for i in order], [infos[i] for i in order]


def rank_order(infos: list[dict], tp: int) -> list[int]:
    """The actors (``infos[i]`` of the actor in bundle ``i // tp``) in rank order. A
    bundle is a TP group on one node: its ranks stay consecutive, ordered by GPU id; the
    groups are ordered by node, then by their first GPU."""
    groups = [sorted(range(d, d + tp), key=lambda i: (infos[i]["gpu_ids"], i))
              for d in range(0, len(infos), tp)]
    groups.sort(key=lambda g: (infos[g[0]]["ip"], infos[g[0]]["node_id"], infos[g[0]]["gpu_ids"], g[0]))
    return [i for group in groups for i in group]


def rendezvous(actors: list, tp: int, dp: int, device: str, timeout_s: float,
               backend: str = "torch") -> list[str]:
    """Join the ranks through the backend registered as ``backend`` (see
    :mod:`raytp.comm.backends`): the ranks it names as leaders make the rendezvous info
    (torch: rank 0's address and a free port there; cupy-nccl: an NCCL unique id per TP
    and per DP group), the driver hands every rank its part, and every rank joins
    concurrently. Returns each rank's device."""
    chosen = get_backend(backend)
    leaders = chosen.leaders(tp, dp)
    made = wait_all([actors[rank].rendezvous_info.remote(chosen, key) for key, rank in leaders.items()],
                    "rendezvous", timeout_s, ranks=list(leaders.values()))
    infos = dict(zip(leaders, made, strict=True))
    refs = [a.join.remote(chosen, rank, tp, dp, device, chosen.rank_info(rank, tp, dp, infos), timeout_s)
            for rank, a in enumerate(actors)]
    return wait_all(refs, "rendezvous", timeout_s)


POLL_S = 1.0  # how often a wait looks at the health monitor


def wait_all(refs: list, phase: str, timeout_s: float | None, health=None,
             ranks: list[int] | None = None) -> list:
    """Results of one call per rank, in rank order (or of one call on each of ``ranks``,
    in that order). The first failure raises a :class:`RankError` naming its rank (a
    :class:`RankDied` when a rank's actor died, also when ``health``, a
    :class:`~raytp.driver.health.HealthMonitor`, saw it die first); ranks missing at the
    deadline, a :class:`PhaseTimeout` naming them."""
    index_of = {ref: i for i, ref in enumerate(refs)}
    rank_of = {ref: i if ranks is None else ranks[i] for ref, i in index_of.items()}
    results: list = [None] * len(refs)
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    pending = list(refs)
    while pending:
        left = None if deadline is None else max(0.0, deadline - time.monotonic())
        ready, pending = ray.wait(pending, num_returns=1, timeout=left if health is None else
                                  min(POLL_S, left) if left is not None else POLL_S)
        if not ready:
            raise_if_dead(health, phase)
            if deadline is not None and time.monotonic() >= deadline:
                raise PhaseTimeout(phase, sorted({rank_of[r] for r in pending}), timeout_s)
            continue
        ref = ready[0]
        try:
            results[index_of[ref]] = get_one(ref, rank_of[ref], phase)
        except RankDied:
            raise
        except RankError:
            # A rank whose peer died may fail first, inside the collective it shared with
            # it ("connection closed by peer"): the death is the failure to report.
            _raise_dead_peer(pending, rank_of, phase, health)
            raise
    return results


def raise_if_dead(health, phase: str) -> None:
    """Raise :class:`RankDied` for the lowest rank ``health`` has seen die, if any."""
    seen = health.first_dead() if health is not None else None
    if seen is not None:
        rank, what = seen
        raise RankDied(rank, phase, f"the rank's actor died: {what['reason']} (seen by the health "
                                    f"monitor during {what['phase']})")


def _raise_dead_peer(pending: list, rank_of: dict, phase: str, health, grace_s: float = 2.0) -> None:
    """Raise :class:`RankDied` for a rank of ``pending`` whose actor is dead, if one turns
    out to be within ``grace_s``."""
    deadline = time.monotonic() + grace_s
    while pending and time.monotonic() < deadline:
        ready, pending = ray.wait(pending, num_returns=1, timeout=max(0.0, deadline - time.monotonic()))
        for ref in ready:
            try:
                ray.get(ref)
            except ray.exceptions.RayActorError as e:
                raise RankDied(rank_of[ref], phase, f"the rank's actor died: {first_line(e)}") from None
            except ray.exceptions.RayError:
                pass
    raise_if_dead(health, phase)


def get_one(ref, rank: int, phase: str):
    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as e:
        cause = e.cause
        err = RankError(rank, phase, f"{type(cause).__name__}: {cause}", str(e))
        err.cause = cause
        raise err from None
    except ray.exceptions.RayActorError as e:
        raise RankDied(rank, phase, f"the rank's actor died: {first_line(e)}") from None


def first_line(e: BaseException) -> str:
    """The first sentence of Ray's message (e.g. "The actor is dead because it was killed
    by `ray.kill`.")."""
    lines = [line for line in str(e).splitlines() if line.strip()]
    line = lines[-1] if lines else type(e).__name__
    return line.split(". ")[0].rstrip(".") + "."


def teardown(actors: list, pg, grace_s: float = 5.0) -> None:
    """Ask every rank to leave its group (for up to ``grace_s``; 0 skips it), then kill the
    actors and free the placement group."""
    if actors and grace_s > 0:
        # a dead actor cannot shut down; it is killed next either way
        with contextlib.suppress(Exception):
            ray.wait([a.shutdown.remote() for a in actors], num_returns=len(actors), timeout=grace_s)
    for a in actors:
        ray.kill(a, no_restart=True)
    if pg is not None:
        remove_placement_group(pg)
