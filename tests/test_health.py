"""The driver's failure handling without ranks: the stall report, the progress bar's
straggler flag, and a recovery that cannot recover."""

import pytest

from raytp.driver import health, progress
from raytp.driver.errors import ClusterFailed, ClusterResourceError, RankDied


def _at(kind, seq, tag, nbytes, blocked, group="tp", phase="train_step", seconds=0.1):
    call = {"group": group, "kind": kind, "seq": seq, "tag": tag, "nbytes": nbytes, "blocked": blocked,
            "seconds": seconds}
    return {"phase": phase, "collectives": {"tp": None, "dp": None, group: call}}


def test_report_names_kind_sequence_layer_and_bytes_of_each_rank():
    # the example: one rank still in #1234 while the others wait in #1235
    answers = [_at("all_reduce", 1235, "layers.3.mlp.fc_out", 8 << 20, True),
               _at("all_reduce", 1234, "layers.3.mlp.fc_out", 8 << 20, True),
               _at("all_reduce", 1235, "layers.3.mlp.fc_out", 8 << 20, True),
               _at("all_reduce", 1235, "layers.3.mlp.fc_out", 8 << 20, True)]
    assert health.report(answers) == (
        "ranks 0, 2, 3 wait in tp all_reduce #1235 (layers.3.mlp.fc_out, 8.0 MiB) during train_step; "
        "rank 1 waits in tp all_reduce #1234 (layers.3.mlp.fc_out, 8.0 MiB) during train_step")


def test_report_of_silent_dead_and_idle_ranks():
    answers = ["no answer", "dead", {"phase": "build", "collectives": {"tp": None, "dp": None}},
               _at("reduce_scatter", 7, None, 512, False, phase=None)]
    assert health.report(answers) == (
        "rank 0 does not answer (stopped, or hung outside Python); rank 1 is dead; "
        "rank 2 has issued no collective yet during build; rank 3 last issued tp reduce_scatter #7 (512 B)")
    # the most recent collective of a rank is the one it is at
    both = {"phase": "step", "collectives": {
        "tp": {**_at("all_reduce", 4, "a", 2048, False)["collectives"]["tp"], "seconds": 9.0},
        "dp": {**_at("all_reduce", 2, "grads", 4096, True, group="dp")["collectives"]["dp"], "seconds": 1.0}}}
    assert health.report([both]) == "rank 0 waits in dp all_reduce #2 (grads, 4.0 KiB) during step"


def test_progress_bar_flags_stragglers():
    shown = progress._postfix({"loss": 1.5, "samples_per_s": 1000.0, "stragglers": [1, 3]})
    assert shown == {"loss": "1.5000", "samples/s": "1,000", "slow": "r1,r3"}
    assert "slow" not in progress._postfix({"loss": 1.5, "stragglers": []})


class _Cluster:
    """What progress._recover uses of a TPCluster, with a recover() that cannot place."""

    def __init__(self):
        self.recovery = type("Policy", (), {"max_failures": 3})()
        self.failures = [{"error": "rank 1 failed in train_step: the rank's actor died"}]
        self.closed = False

    def recover(self):
        raise ClusterResourceError("could not place tp=2 x dp=1 ranks within 120s")

    def close(self):
        self.closed = True


def test_a_recovery_that_cannot_recover_closes_the_cluster():
    cluster = _Cluster()
    error = RankDied(1, "train_step", "the rank's actor died")
    with pytest.raises(ClusterFailed, match=r"recovering from it failed \(ClusterResourceError: could not "
                                            r"place.*\); the cluster is closed"):
        progress._recover(cluster, replay=None, bar=None, error=error, base=0)
    assert cluster.closed
