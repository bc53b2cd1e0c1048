"""fit(..., log_dir=...): TensorBoard event files hold every step's summary and each
evaluation, read back with TensorBoard's own reader."""

import numpy as np
import pytest

import raytp
from raytp.schedules import WarmupCosine

import nets
from nets import PLAN, Net, make_batches

pytest.importorskip("ray")
event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")

RAY_BY_VALUE = (nets,)


def _scalars(log_dir) -> dict[str, list[tuple[int, float]]]:
    acc = event_accumulator.EventAccumulator(str(log_dir))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_fit_writes_steps_and_evaluations(ray_local, tmp_path):
    batches = make_batches(6)
    with raytp.TPCluster(tp=2, device="cpu") as cluster:
        cluster.build(Net, plan=PLAN, optimizer=raytp.AdamW(lr=0.01), seed=0,
                      lr_schedule=WarmupCosine(warmup_steps=2, total_steps=6, min_lr_ratio=0.1))
        history = cluster.fit(batches, eval_batch=batches[0], eval_every=3, progress=False,
                              log_dir=str(tmp_path / "tb"))
    scalars = _scalars(tmp_path / "tb")
    steps = [h["step"] for h in history]
    assert [s for s, _ in scalars["train/loss"]] == steps == list(range(6))
    np.testing.assert_allclose([v for _, v in scalars["train/loss"]], [h["loss"] for h in history], rtol=1e-6)
    np.testing.assert_allclose([v for _, v in scalars["train/lr"]], [h["lr"] for h in history], rtol=1e-6)
    assert len({round(v, 9) for _, v in scalars["train/lr"]}) > 3  # the schedule moved it
    np.testing.assert_allclose([v for _, v in scalars["train/grad_norm"]], [h["grad_norm"] for h in history],
                               rtol=1e-6)
    evaluated = [h for h in history if "eval_loss" in h]
    assert [s for s, _ in scalars["eval/loss"]] == [h["step"] for h in evaluated] == [2, 5]
    np.testing.assert_allclose([v for _, v in scalars["eval/loss"]], [h["eval_loss"] for h in evaluated],
                               rtol=1e-6)
    assert {"train/samples_per_s", "train/step_s"} <= set(scalars)
