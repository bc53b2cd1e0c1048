"""Errors the driver raises: each names the rank and the phase."""

from __future__ import annotations


class RankError(RuntimeError):
    """A rank failed in a phase; ``remote_traceback`` is the rank's own traceback."""

    def __init__(self, rank: int, phase: str, message: str, remote_traceback: str = ""):
        self.rank, self.phase, self.remote_traceback = rank, phase, remote_traceback
        self.message = message
        self.cause: BaseException | None = None  # the rank's exception, when it came back
        text = f"rank {rank} failed in {phase}: {message}"
        if remote_traceback:
            text += f"\n\n--- traceback on rank {rank} ---\n{remote_traceback}"
        super().__init__(text)


class PhaseTimeout(TimeoutError):
    """Some ranks did not finish a phase within its deadline."""

    def __init__(self, phase: str, ranks: list[int], timeout_s: float):
        self.phase, self.ranks, self.timeout_s = phase, ranks, timeout_s
        super().__init__(f"{phase}: ranks {ranks} did not finish within {timeout_s:g}s")


class ClusterResourceError(RuntimeError):
    """The Ray cluster cannot provide the resources the ranks need."""


class RankDied(RankError):
    """A rank's process ended (killed, crashed, its node lost) during a phase."""


class RankHung(PhaseTimeout):
    """A phase passed its deadline; ``report`` says where every rank was."""

    def __init__(self, phase: str, ranks: list[int], timeout_s: float, report: str):
        super().__init__(phase, ranks, timeout_s)
        self.report = report
        self.args = (f"{phase}: ranks {ranks} did not finish within {timeout_s:g}s. {report}",)


class ClusterFailed(RuntimeError):
    """The ranks failed more often than ``max_failures`` allows; the cluster is closed."""


# failures of the machinery (a process gone, a rank stuck), after which the group is torn
# down and, within max_failures, rebuilt from the last checkpoint; an exception that a
# rank raised (a bug, bad data) is not retried
RECOVERABLE = (RankDied, PhaseTimeout)
