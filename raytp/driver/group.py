"""``RankGroup``: the rank actors of one cluster and their life — the placement group,
start-up and rendezvous, the health monitor, the one call every phase makes, waiting
with deadlines, tear-down after a failure, and the record of failures."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import ray

from raytp.driver import health, launch
from raytp.driver.errors import RECOVERABLE, RankDied, RankError, RankHung
from raytp.driver.health import HealthMonitor
from raytp.driver.pending import check_picklable

log = logging.getLogger(__name__)

SETTLE_S = 5.0  # how long the other ranks may take to end a phase in which one raised


class RankGroup:
    """``tp x dp`` rank actors in one placement group (a bundle per TP group, so a TP
    group never spans nodes), joined into one collective world through ``backend``.

    ``call`` submits one :meth:`~actors.RankActor.execute` per rank and ``wait`` reads
    the results; a rank that dies or a phase past ``phase_timeout_s`` tears the group
    down (naming where each rank was) before the error is raised, and the failure is
    appended to ``failures``. ``restart`` brings up a new group in its place.
    """

    def __init__(self, tp: int, dp: int, device: str, backend: str, *, log_level: int,
                 timeout_s: float, phase_timeout_s: float | None):
        self.tp, self.dp, self.device, self.backend = tp, dp, device, backend
        self.log_level, self.timeout_s, self.phase_timeout_s = log_level, timeout_s, phase_timeout_s
        self.actors: list = []
        self.nodes: list[dict] = []
        self.pg = None
        self.health: HealthMonitor | None = None  # pings the ranks while they run
        self.failures: list[dict] = []  # each rank failure survived or not: rank, phase, cause, times
        self.last_phase = "start"  # the last call given to the ranks (what a dead rank was doing)

    @property
    def world_size(self) -> int:
        return self.tp * self.dp

    def start(self) -> None:
        """Reserve the placement group, start the rank actors and join them."""
        self.pg = launch.reserve(self.tp, self.dp, self.device, self.timeout_s)
        self.actors, self.nodes = launch.start_actors(self.pg, self.tp, self.dp, self.device,
                                                      self.log_level, self.timeout_s)
        launch.rendezvous(self.actors, self.tp, self.dp, self.device, self.timeout_s, self.backend)
        self.health = HealthMonitor(self.actors, lambda: self.last_phase)

    def restart(self) -> None:
        """A new group in place of this one (after a failure)."""
        self.teardown()
        self.start()

    # -- calls ------------------------------------------------------------------------

    def call(self, method: str | Callable, per_rank_args: list[tuple] | None = None,
             phase: str | None = None, **kwargs) -> list:
        """One ``execute(method, *args, **kwargs)`` per rank, with that rank's ``args``;
        returns the object refs, in rank order."""
        self.check_alive()
        self.last_phase = phase or getattr(method, "__name__", str(method))
        per_rank_args = per_rank_args if per_rank_args is not None else [()] * self.world_size
        return [a.execute.remote(method, *args, **kwargs)
                for a, args in zip(self.actors, per_rank_args, strict=True)]

    def build(self, spec) -> list[dict]:
        """Build every rank's engine from ``spec``; their descriptions. Refused here first,
        before any rank work, are sizes tp does not divide, module-name patterns that match
        nothing (:meth:`BuildSpec.check`) and parts that cannot be pickled."""
        spec.check(self.tp)
        for name in ("model", "loss_fn", "plan", "optimizer", "lr_schedule"):
            check_picklable(name, getattr(spec, name))
        self.check_alive()
        self.last_phase = "build"
        return self.wait([a.build.remote(spec) for a in self.actors], "build")

    def wait(self, refs: list, phase: str) -> list:
        """Every rank's result of one call; a rank that dies or a phase past its deadline
        tears the group down (naming where each rank was) before the error is raised."""
        try:
            return launch.wait_all(refs, phase, self.phase_timeout_s, self.health)
        except RECOVERABLE as e:
            raise self.fail(e) from None
        except RankError as e:  # the rank's own exception: the others may be stuck waiting for it
            raise self._settle(e, refs) from None

    def check_alive(self) -> None:
        """Raise if the group is gone: a rank the health monitor saw die since the last
        call (the group is torn down first), a failure not recovered from, or closed."""
        if self.actors:
            try:
                launch.raise_if_dead(self.health, self.last_phase)
            except RankDied as e:
                raise self.fail(e) from None
            return
        if self.failures and not self.failures[-1].get("recovered"):
            raise RuntimeError(f"this TPCluster lost its ranks ({self.failures[-1]['error']}); "
                               "call recover() to rebuild them from the last checkpoint, or close()")
        raise RuntimeError("this TPCluster is closed")

    # -- failures -----------------------------------------------------------------------

    def fail(self, error: Exception) -> Exception:
        """After a rank failure: name where each rank is (a stall), abort the communicators
        of the ranks that still answer, end every actor and free the placement group;
        record the failure. Returns the error to raise."""
        at = time.time()
        if isinstance(error, RankDied):
            gone = [error.rank]
        else:
            report, gone = health.diagnose(self.actors, error.phase)
            error = RankHung(error.phase, error.ranks, error.timeout_s, report)
        ranks = [error.rank] if isinstance(error, RankDied) else error.ranks
        self._end(error, ranks, at, gone)
        return error

    def _settle(self, error: RankError, refs: list) -> RankError:
        """After ``error`` (an exception a rank raised itself): the other ranks get
        ``SETTLE_S`` to end the phase. Those still in it then wait in a collective that the
        failed rank will never join; rather than leave them there until the deadline, the
        group is torn down as after a hang, and the error says where they were and that
        ``recover()`` rebuilds the ranks."""
        _, running = ray.wait(refs, num_returns=len(refs), timeout=SETTLE_S)
        if not running:
            return error
        at = time.time()
        stuck = sorted(refs.index(r) for r in running)
        report, gone = health.diagnose(self.actors, error.phase)
        note = (f"{error.message}; ranks {stuck} were still in {error.phase} {SETTLE_S:g}s later "
                f"({report}), so the group was torn down: call recover() to rebuild it from the last "
                "checkpoint, or close()")
        failed = RankError(error.rank, error.phase, note, error.remote_traceback)
        failed.cause = error.cause
        self._end(failed, [error.rank], at, gone)
        return failed

    def _end(self, error: Exception, ranks: list[int], at: float, gone: list[int]) -> None:
        health.abort([a for rank, a in enumerate(self.actors) if rank not in gone])
        self.teardown(grace_s=0)  # a stuck phase would hold up a graceful shutdown
        self.failures.append({"error": str(error).splitlines()[0], "phase": error.phase, "ranks": ranks,
                              "at": at, "torn_down_s": time.time() - at, "recovered": False})
        log.error("%s; the ranks were torn down", str(error).splitlines()[0])

    def mark_recovered(self, position: int) -> None:
        """Every failure not yet recovered from (one while recovering, too) is, now."""
        for failure in self.failures:
            if not failure["recovered"]:
                failure.update(recovered=True, recovery_s=time.time() - failure["at"], resumed_at=position)

    def teardown(self, grace_s: float = 5.0) -> None:
        """Stop the health monitor, end the actors and free the placement group."""
        if self.health is not None:
            self.health.stop()
            self.health = None
        launch.teardown(self.actors, self.pg, grace_s)
        self.actors, self.pg = [], None
