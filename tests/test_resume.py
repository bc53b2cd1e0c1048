"""Resuming and callbacks of ``fit``: checkpoints named by the steps completed, ``fit``
skipping what a loaded checkpoint covers, ``resume()`` on a new driver after the old one
was killed (the same losses as an uninterrupted run), and ``callbacks`` seeing every
step, evaluation and checkpoint."""

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import raytp
from raytp.driver.callbacks import Callback

import nets
from nets import PLAN, Net, make_batches, reference_losses

pytest.importorskip("ray")

RAY_BY_VALUE = (nets,)
HERE = Path(__file__).parent
OPT = raytp.AdamW(lr=0.01)


class Recorder(Callback):
    def __init__(self):
        self.events = []

    def on_step(self, summary):
        self.events.append(("step", summary["step"], summary["loss"]))

    def on_eval(self, summary):
        self.events.append(("eval", summary["step"], summary["eval_loss"]))

    def on_checkpoint(self, path):
        self.events.append(("checkpoint", Path(path).name))


@pytest.fixture(scope="module")
def cluster2(ray_local):
    with raytp.TPCluster(tp=2, device="cpu") as cluster:  # no checkpoint_dir
        yield cluster


@pytest.fixture(scope="module")
def uninterrupted(cluster2):
    """The losses of 10 steps in one fit(), without checkpoints (tests/_crash_driver.py's run)."""
    cluster2.build(Net, plan=PLAN, optimizer=OPT, seed=0)
    return [h["loss"] for h in cluster2.fit(make_batches(10), progress=False)]


def test_checkpoints_named_by_steps_callbacks_and_fit_resumes_after_load(ray_local, uninterrupted, tmp_path):
    batches = make_batches(7)
    recorder = Recorder()
    with raytp.TPCluster(tp=2, device="cpu", checkpoint_dir=str(tmp_path), checkpoint_every=3) as cluster:
        with pytest.raises(RuntimeError, match=r"resume\(\) before build\(\): build the same model first"):
            cluster.resume()
        cluster.build(Net, plan=PLAN, optimizer=OPT, seed=0)
        assert cluster.resume() == {"checkpoint": None, "data_position": 0, "step": None, "extra": None}
        history = cluster.fit(batches, eval_batch=batches[0], eval_every=2, callbacks=[recorder],
                              progress=False)
        losses = [h["loss"] for h in history]
        assert losses == uninterrupted[:7]
        np.testing.assert_allclose(losses, reference_losses(batches, OPT), rtol=1e-12)
        steps = [e[1:] for e in recorder.events if e[0] == "step"]
        assert steps == [(h["step"], h["loss"]) for h in history]
        evals = [e[1:] for e in recorder.events if e[0] == "eval"]
        assert evals == [(h["step"], h["eval_loss"]) for h in history if "eval_loss" in h]
        assert [s for s, _ in evals] == [1, 3, 5]
        # each checkpoint after exactly the steps its name says, before the next step's summary
        kinds = [e[0] if e[0] != "checkpoint" else e[1] for e in recorder.events if e[0] != "eval"]
        assert kinds == ["step"] * 3 + ["step-00000003"] + ["step"] * 3 + ["step-00000006"] + ["step"]
        assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000003", "step-00000006"]

        assert cluster.load(str(tmp_path / "step-00000003"))["data_position"] == 3
        resumed = cluster.fit(batches, progress=False)  # the first 3 batches are skipped
        assert [h["step"] for h in resumed] == [3, 4, 5, 6]
        assert [h["loss"] for h in resumed] == losses[3:]
        assert [h["step"] for h in cluster.fit(batches[:1], progress=False)] == [7]  # nothing skipped now

        cluster.load(str(tmp_path / "step-00000006"))
        assert [h["loss"] for h in cluster.fit(batches, resume=False, steps=1, progress=False)] != losses[6:]
        cluster.build(Net, plan=PLAN, optimizer=OPT, seed=0)
        state = cluster.resume()
        assert (Path(state["checkpoint"]).name, state["data_position"]) == ("step-00000006", 6)
        assert [h["loss"] for h in cluster.fit(batches, progress=False)] == losses[6:]


def test_resume_and_callbacks_refuse_what_they_cannot_do(cluster2):
    cluster2.build(Net, plan=PLAN, optimizer=OPT, seed=0)
    with pytest.raises(ValueError, match=r"resume\(\) needs TPCluster\(..., checkpoint_dir=...\)"):
        cluster2.resume()
    with pytest.raises(TypeError, match=r"callback 3 has none of the methods on_step, on_eval, "
                                        r"on_checkpoint; subclass raytp.driver.callbacks.Callback"):
        cluster2.fit(make_batches(1), callbacks=[3], progress=False)
    with pytest.raises(TypeError, match=r"^callbacks must be a list of objects with on_step"):
        cluster2.fit(make_batches(1), callbacks=Recorder(), progress=False)
    assert cluster2.data_position == 0  # refused before any step


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}/stat").is_file() and Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"


def test_a_killed_driver_resumes_on_a_new_one_with_the_same_losses(uninterrupted, tmp_path):
    """A driver process (its own local Ray) checkpoints every 3 steps and is SIGKILLed after
    step 7; its rank actors die with it. A new driver process calls resume(): from
    step-00000006 it trains steps 6..9, with exactly the uninterrupted run's losses."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["OMP_NUM_THREADS"] = "1"
    cmd = [sys.executable, str(HERE / "_crash_driver.py"), str(tmp_path)]
    killed = subprocess.Popen([*cmd, "7"], stdout=subprocess.PIPE, text=True, env=env, start_new_session=True)
    try:
        first = []
        for line in killed.stdout:
            first.append(json.loads(line))
            if first[-1].get("step") == 7:
                break
        killed.send_signal(signal.SIGKILL)
        killed.wait(timeout=30)
        rank_pids = first[0]["rank_pids"]
        deadline = time.monotonic() + 60
        while any(map(_alive, rank_pids)) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not any(map(_alive, rank_pids)), "the killed driver's rank actors are still running"
    finally:
        with contextlib.suppress(ProcessLookupError):  # Ray's agents of its session: its process group
            os.killpg(killed.pid, signal.SIGKILL)
    assert first[1] == {"resumed": None, "data_position": 0}
    assert [e["checkpoint"] for e in first if "checkpoint" in e] == ["step-00000003", "step-00000006"]
    assert [e["loss"] for e in first if "loss" in e] == uninterrupted[:8]

    resumed = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env, start_new_session=True)
    try:
        second = [json.loads(line) for line in resumed.stdout]
        assert resumed.wait(timeout=300) == 0
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(resumed.pid, signal.SIGKILL)
    assert second[1] == {"resumed": "step-00000006", "data_position": 6}
    assert [e["step"] for e in second if "step" in e] == [6, 7, 8, 9]
    assert [e["loss"] for e in second if "loss" in e] == uninterrupted[6:]
    assert [e["checkpoint"] for e in second if "checkpoint" in e] == ["step-00000009"]
