"""Rank failures during training, on CPU ranks: killed (ray.kill from the driver, and
os._exit inside the actor) in forward, backward, the optimizer step, a checkpoint save
and a checkpoint load, and stopped (SIGSTOP). The run recovers from the last good
checkpoint with the losses of an uninterrupted run, or ends in a clear error; nothing
is left behind.

Faults follow a plan (a list of entries fired in order, once each; a marker file per
entry records the firing). Entries of mode "exit" and "stop" fire inside the actor
from the loss function, a backward hook, the optimizer or its checkpoint hooks; for
mode "kill" the rank waits there and a watcher thread on the driver ray.kill()s it.
"""

import json
import os
import signal
import threading
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import raytp
from raytp.driver import ClusterFailed
from raytp.driver.launch import CONTROL

import nets
from nets import PLAN, Net

ray = pytest.importorskip("ray")

RAY_BY_VALUE = (nets,)
STEPS, EVERY = 20, 4


# -- the fault plan ---------------------------------------------------------------------

def _next(plan_path):
    """The first entry of the plan that has not fired, and when the one before fired."""
    before = 0.0
    for i, entry in enumerate(json.loads(Path(plan_path).read_text())):
        marker = Path(f"{plan_path}.{i}")
        if not marker.exists():
            return i, entry, before
        before = float(marker.read_text())
    return None


def _fired(plan_path, i):
    """Write the marker atomically: another process may read it at any moment."""
    tmp = Path(f"{plan_path}.{i}.{os.getpid()}.tmp")
    tmp.write_text(str(time.time()))
    tmp.rename(f"{plan_path}.{i}")


def _built() -> float:
    """When this rank built its model. Calls queued before a failure may still run on the
    surviving ranks until they are torn down; an entry fires only in a rank built after
    the entry before it fired, i.e. in the rebuilt group."""
    return float(os.environ.get("CHAOS_BUILT", "0"))


def fault(plan_path, phase, rank, step=None):
    """Called inside a rank at ``phase``: fire the next entry of the plan if it is this one."""
    nxt = _next(plan_path)
    if nxt is None:
        return
    i, entry, before = nxt
    if entry["phase"] != phase or entry["rank"] != rank or entry.get("step", step) != step:
        return
    if _built() < before:
        return
    if entry["mode"] == "kill":  # wait here for the driver's ray.kill
        time.sleep(60)
        return
    _fired(plan_path, i)
    if entry["mode"] == "exit":
        os._exit(1)
    os.kill(os.getpid(), signal.SIGSTOP)


def _rank():
    import torch.distributed as dist

    return dist.get_rank()


def faulty_loss(plan_path):
    def loss_fn(model, batch):
        step = int(batch["step"][0])
        fault(plan_path, "forward", _rank(), step)
        loss = F.cross_entropy(model(batch["x"]), batch["y"])
        loss.register_hook(lambda g: fault(plan_path, "backward", _rank(), step) or g)
        return loss

    return loss_fn


class _State(defaultdict):
    """The optimizer state; checkpoint saves read it with ``get``."""

    plan_path = None

    def __init__(self, state, plan_path):
        super().__init__(dict, state)
        self.plan_path = plan_path

    def get(self, key, default=None):
        fault(self.plan_path, "save", _rank())
        return super().get(key, default)


class FaultyAdamW:
    """An optimizer spec whose optimizer fails when the plan says so."""

    def __init__(self, plan_path):
        self.plan_path = plan_path

    def build(self, params):
        plan_path = self.plan_path
        os.environ["CHAOS_BUILT"] = str(time.time())  # in the rank's process: see _built()

        class Optimizer(torch.optim.AdamW):
            def __init__(self, *a, **kw):
                super().__init__(*a, **kw)
                self.state = _State(self.state, plan_path)

            def step(self, closure=None):
                step = next((int(s["step"]) for s in self.state.values() if "step" in s), 0)
                fault(plan_path, "optim", _rank(), step)
                return super().step(closure)

            def load_state_dict(self, state_dict):
                fault(plan_path, "load", _rank())
                super().load_state_dict(state_dict)
                self.state = _State(self.state, plan_path)

        return Optimizer(list(params), lr=0.01)


def _watch(cluster, plan_path, stop):
    """Fire the plan's "kill" entries: ray.kill the rank once it waits at the entry (in a
    group rebuilt after the entry before fired)."""
    while not stop.is_set():
        nxt = _next(plan_path)
        if nxt is None:
            return
        i, entry, before = nxt
        actors = list(cluster.actors)
        if entry["mode"] != "kill" or len(actors) <= entry["rank"]:
            time.sleep(0.05)
            continue
        try:
            where = ray.get(actors[entry["rank"]].where.options(concurrency_group=CONTROL).remote(),
                            timeout=2)
        except Exception:  # noqa: BLE001 - the rank is being replaced
            time.sleep(0.05)
            continue
        if (where["built_at"] or 0) < before:
            time.sleep(0.05)
            continue
        at = where["engine_phase"] or where["phase"]
        steps_match = entry.get("step") is None or where["step"] == entry["step"]
        if at == {"forward": "forward", "backward": "backward", "optim": "optim",
                  "save": "save", "load": "load"}[entry["phase"]] and steps_match:
            _fired(plan_path, i)
            ray.kill(actors[entry["rank"]])
        time.sleep(0.02)


# -- runs ---------------------------------------------------------------------------------

def batches(n=STEPS, seed=0):
    rng = np.random.default_rng(seed)
    return [{"x": rng.standard_normal((8, 12)), "y": rng.integers(0, 5, 8), "step": np.full(8, k)}
            for k in range(n)]


def reference_losses(n=STEPS):
    torch.manual_seed(0)
    model = Net()
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    losses = []
    for b in batches(n):
        loss = F.cross_entropy(model(torch.from_numpy(b["x"])), torch.from_numpy(b["y"]))
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def _run(tmp_path, plan, max_failures, device="cpu", **cluster_kw):
    plan_path = tmp_path / "plan.json"
    plan_path.write_text(json.dumps(plan))
    cluster = raytp.TPCluster(tp=2, device=device, max_failures=max_failures,
                              checkpoint_dir=str(tmp_path / "ckpt"), checkpoint_every=EVERY, **cluster_kw)
    stop = threading.Event()
    watcher = threading.Thread(target=_watch, args=(cluster, str(plan_path), stop), daemon=True)
    watcher.start()
    try:
        cluster.build(Net, plan=PLAN, loss_fn=faulty_loss(str(plan_path)),
                      optimizer=FaultyAdamW(str(plan_path)), seed=0)
        history = cluster.fit(batches(), progress=False)
        return cluster, history, plan_path
    finally:
        stop.set()
        watcher.join(timeout=10)
        cluster.close()


def _report(name, plan, plan_path, cluster):
    """With RAYTP_CHAOS_REPORT=<file>, add each fault's detection and recovery times there
    (docs/reliability.md is written from it)."""
    out = os.environ.get("RAYTP_CHAOS_REPORT")
    if not out:
        return
    rows = json.loads(Path(out).read_text()) if Path(out).exists() else []
    for i, (entry, failure) in enumerate(zip(plan[:len(cluster.failures)], cluster.failures, strict=True)):
        fired = float(Path(f"{plan_path}.{i}").read_text())
        rows.append({"test": name, **entry, "detected_s": failure["at"] - fired,
                     "recovered_s": failure.get("recovery_s"), "resumed_at": failure.get("resumed_at"),
                     "error": failure["error"]})
    Path(out).write_text(json.dumps(rows, indent=1))


def _rank_processes() -> list[str]:
    """The command lines of the rank actor processes of this test process's own local Ray
    (its raylet is our child, the workers its children; another pytest worker's Ray is not
    looked at). Ray titles a worker by its actor class: "ray::RankActor.train_step"."""
    import psutil

    found = []
    for proc in psutil.Process().children(recursive=True):
        try:
            cmd, status = " ".join(proc.cmdline()), proc.status()
        except psutil.NoSuchProcess:
            continue
        if cmd.startswith("ray::RankActor") and status != psutil.STATUS_ZOMBIE:
            found.append(cmd)
    return found


def _assert_nothing_left(cluster, within_s: float = 30.0):
    """No placement group of the run left, and no rank process alive: not the ones that
    were killed or stopped, not the ones the recoveries made."""
    assert cluster.actors == [] and cluster.group.pg is None
    removed = [pg for pg in ray.util.placement_group_table().values() if pg["state"] != "REMOVED"]
    assert not removed, removed
    _assert_no_rank_processes(within_s)


def _assert_no_rank_processes(within_s: float = 30.0):
    deadline = time.monotonic() + within_s  # a killed worker takes a moment to exit
    while (left := _rank_processes()) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not left, left


KILLS = [  # every (phase, way of dying) pair, each fired once, in this order
    {"phase": "forward", "rank": 1, "step": 2, "mode": "exit"},
    {"phase": "backward", "rank": 0, "step": 5, "mode": "kill"},
    {"phase": "optim", "rank": 1, "step": 6, "mode": "exit"},
    {"phase": "save", "rank": 0, "mode": "kill"},  # the 2nd save: the 1st checkpoint is used
    {"phase": "load", "rank": 1, "mode": "exit"},  # that recovery's load dies too
    {"phase": "forward", "rank": 0, "step": 9, "mode": "kill"},
    {"phase": "backward", "rank": 1, "step": 10, "mode": "exit"},
    {"phase": "optim", "rank": 0, "step": 13, "mode": "kill"},
    {"phase": "save", "rank": 1, "mode": "exit"},
    {"phase": "load", "rank": 0, "mode": "kill"},
]


def test_killed_ranks_recover_with_the_same_losses(ray_local, tmp_path):
    cluster, history, plan_path = _run(tmp_path, KILLS, max_failures=len(KILLS))
    _report("killed", KILLS, plan_path, cluster)
    fired = [Path(f"{plan_path}.{i}").exists() for i in range(len(KILLS))]
    assert all(fired), f"faults that never fired: {[k for k, f in zip(KILLS, fired, strict=True) if not f]}"
    assert len(cluster.failures) == len(KILLS)
    assert all(f["recovered"] for f in cluster.failures)
    phases = [f["phase"] for f in cluster.failures]
    assert {"train_step", "save", "load"} <= set(phases), phases
    np.testing.assert_allclose([h["loss"] for h in history], reference_losses(), rtol=1e-10)
    assert [h["step"] for h in history] == list(range(STEPS))
    _assert_nothing_left(cluster)


def test_stopped_rank_is_named_within_the_deadline(ray_local, tmp_path):
    plan = [{"phase": "forward", "rank": 1, "step": 3, "mode": "stop"}]
    start = time.time()
    cluster, history, plan_path = _run(tmp_path, plan, max_failures=1, phase_timeout_s=8)
    _report("stopped", plan, plan_path, cluster)
    failure = cluster.failures[0]
    assert "rank 1 does not answer" in failure["error"], failure
    assert "rank 0 waits in tp all_reduce" in failure["error"] and "fc_out" in failure["error"], failure
    stopped_at = float(Path(f"{tmp_path}/plan.json.0").read_text())
    # the deadline passes 8 s after the driver began to wait for the step (which can be a
    # moment before the rank stopped in it); the report (a probe of at most 5 s) and the
    # tear-down follow within seconds, well inside the 60 s bound
    assert 7.5 <= failure["at"] - stopped_at < 30 and failure["recovered"], (failure, stopped_at - start)
    assert failure["torn_down_s"] < 60, failure
    np.testing.assert_allclose([h["loss"] for h in history], reference_losses(), rtol=1e-10)
    _assert_nothing_left(cluster)


def test_past_max_failures_is_a_clear_error_and_closes_the_cluster(ray_local, tmp_path):
    plan = [{"phase": "forward", "rank": 1, "step": 1, "mode": "exit"},
            {"phase": "forward", "rank": 0, "step": 2, "mode": "exit"}]
    with pytest.raises(ClusterFailed, match=r"rank \d failed in train_step: the rank.s actor died: The "
                                            r"actor is dead.*"
                                            r"failure 2 with max_failures=1; the cluster is closed"):
        _run(tmp_path, plan, max_failures=1)
    removed = [pg for pg in ray.util.placement_group_table().values() if pg["state"] != "REMOVED"]
    assert not removed
    _assert_no_rank_processes()


def test_an_idle_rank_that_dies_is_seen_by_the_health_monitor(ray_local):
    """Killed while the driver waits on nothing: the monitor sees it within 10 s, and the
    next call raises it, naming the rank and the phase it was last given."""
    from raytp.driver import RankDied

    with raytp.TPCluster(tp=2, device="cpu") as cluster:
        cluster.build(Net, plan=PLAN, optimizer=raytp.AdamW(lr=0.01), seed=0)
        cluster.train_step(batches(1)[0])
        killed = time.monotonic()
        ray.kill(cluster.actors[1])
        while not cluster.group.health.dead and time.monotonic() - killed < 30:
            time.sleep(0.1)
        seen_s = time.monotonic() - killed
        assert 1 in cluster.group.health.dead and seen_s < 10, (cluster.group.health.dead, seen_s)
        if os.environ.get("RAYTP_CHAOS_REPORT"):
            out = Path(os.environ["RAYTP_CHAOS_REPORT"])
            rows = json.loads(out.read_text()) if out.exists() else []
            rows.append({"test": "idle", "phase": "idle", "rank": 1, "mode": "kill", "detected_s": seen_s,
                         "recovered_s": None, "resumed_at": None,
                         "error": cluster.group.health.dead[1]["reason"]})
            out.write_text(json.dumps(rows, indent=1))
        with pytest.raises(RankDied, match=r"rank 1 failed in train_step: the rank's actor died: .*\(seen "
                                           r"by the health monitor during train_step\)"):
            cluster.train_step(batches(1)[0])
        assert cluster.actors == [] and cluster.failures[-1]["ranks"] == [1]
    _assert_nothing_left(cluster)
