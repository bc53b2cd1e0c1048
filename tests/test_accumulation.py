"""Gradient accumulation: a batch split into k micro-batches on the ranks gives the
parameters of one k=1 step (float64, 3 AdamW steps with clipping, k = 1, 2, 4, at tp=2
and at dp=2 x tp=2), with ignored labels spread unevenly over the micro-batches (one of
them holds none to count), so that a mean of micro-batch means would differ; no DP
collective before the step; bad sizes refused before any rank work."""

import numpy as np
import pytest
import torch
from torch import nn

import raytp
from raytp.comm import count_collectives
from raytp.engine import BuildSpec, build_engine
from raytp.engine.accumulate import split
from raytp.models import GPTConfig

import _dist
from helpers import mesh

CONFIG = GPTConfig(vocab_size=37, n_layers=2, n_heads=4, d_model=32, d_ff=48, max_seq_len=16, dtype="float64")
ROWS, T, STEPS = 8, 8, 3
PARITY = {"rtol": 1e-9, "atol": 1e-11}  # float64: rounding only
PLAN = {"fc_in": "colwise", "fc_out": "rowwise"}


COUNTED = [0, 1, 7, 7, 2, 7, 5, 7]  # labels counted per row: uneven in every micro-batch split, DP slice


def _batch(step: int) -> dict[str, torch.Tensor]:
    """(ROWS, T) ids and labels; row r counts its first COUNTED[r] labels (row 0 none)."""
    g = torch.Generator().manual_seed(step)
    ids = torch.randint(0, 37, (ROWS, T), generator=g)
    labels = torch.randint(0, 37, (ROWS, T), generator=g)
    labels[torch.arange(T) >= torch.tensor(COUNTED)[:, None]] = -100
    return {"input_ids": ids, "labels": labels}


def _group_slice(batch, m):
    n = ROWS // m.dp_size
    return {k: v[m.dp_rank * n:(m.dp_rank + 1) * n] for k, v in batch.items()}


def _train(k: int, dp: int):
    m = mesh(2, dp)
    spec = BuildSpec(model=CONFIG, optimizer=raytp.AdamW(lr=1e-2, weight_decay=0.1), max_grad_norm=0.5,
                     micro_batches=k)
    engine = build_engine(m, spec)
    losses, dp_counts = [], []
    for step in range(STEPS):
        with count_collectives() as before_step:
            engine.forward(_group_slice(_batch(step), m))
            engine.backward()
        with count_collectives() as in_step:
            losses.append(engine.step()["loss"])
        dp_counts.append((before_step.count(group="dp"), before_step.count(group="tp"),
                          in_step.count(group="dp")))
    losses.append(engine.evaluate(_group_slice(_batch(STEPS), m))["loss"])  # split too, the same mean
    params = {name: engine.gather(name) for name, _ in engine.model.named_parameters()}
    return losses, params, dp_counts


def _mean_of_means(k: int):
    """The first batch's loss, and the plain mean of its k micro-batches' losses (tp=2)."""
    engine = build_engine(mesh(2), BuildSpec(model=CONFIG))
    batch = _batch(0)
    means = [engine.evaluate(micro)["loss"] for micro in split(batch, k)]
    return engine.evaluate(batch)["loss"], means


@pytest.mark.parametrize("dp", [1, 2])
def test_micro_batches_give_the_parameters_of_one_batch(dp):
    runs = {k: _dist.run(2 * dp, _train, k, dp)[0] for k in (1, 2, 4)}
    ref_losses, ref_params, _ = runs[1]
    for k in (2, 4):
        losses, params, counts = runs[k]
        torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), **PARITY)
        for name, full in ref_params.items():
            torch.testing.assert_close(params[name], full, **PARITY,
                                       msg=lambda msg, n=name, k=k: f"k={k} {n}: {msg}")
        for before_dp, before_tp, step_dp in counts:
            assert before_dp == 0, f"k={k}: {before_dp} DP collectives during the micro-batches"
            assert before_tp > 0  # the TP layers' collectives did run there
            assert step_dp == (1 if dp > 1 else 0), f"k={k}: {step_dp} DP collectives in the step"
    assert all(c[2] == (1 if dp > 1 else 0) for c in runs[1][2])


def test_mean_of_micro_batch_means_would_differ():
    """The batch above is a test that can fail: weighting micro-batches equally is off by far
    more than the float64 parity tolerance."""
    whole, means = _dist.run(2, _mean_of_means, 2)[0]
    assert abs(np.mean(means) - whole) > 1e-6, f"whole-batch mean {whole}, micro-batch means {means}"
    _, means8 = _dist.run(2, _mean_of_means, 8)[0]
    assert np.isnan(means8[0])  # row 0 counts no token: its mean is 0 / 0 (the dp=2, k=4 runs meet it)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc_in = nn.Linear(6, 16, dtype=torch.float64)
        self.fc_out = nn.Linear(16, 3, dtype=torch.float64)

    def forward(self, x):
        return self.fc_out(torch.tanh(self.fc_in(x)))


def _plain_module(k: int):
    """A plain module under the default x/y loss: micro-batches weighted by samples."""
    engine = build_engine(mesh(2), BuildSpec(model=Net, plan=PLAN, optimizer=raytp.SGD(lr=0.5),
                                             micro_batches=k))
    g = torch.Generator().manual_seed(3)
    metrics = [engine.train_step({"x": torch.randn(8, 6, generator=g, dtype=torch.float64),
                                  "y": torch.randint(0, 3, (8,), generator=g)}) for _ in range(STEPS)]
    params = {name: engine.gather(name) for name, _ in engine.model.named_parameters()}
    return [(r["loss"], r["accuracy"]) for r in metrics], params


def test_plain_module_micro_batches_by_samples():
    ref_metrics, ref_params = _dist.run(2, _plain_module, 1)[0]
    metrics, params = _dist.run(2, _plain_module, 4)[0]
    torch.testing.assert_close(torch.tensor(metrics), torch.tensor(ref_metrics), **PARITY)
    for name, full in ref_params.items():
        torch.testing.assert_close(params[name], full, **PARITY)


@pytest.mark.parametrize("value", [0, -1, 1.5, True, "2"])
def test_bad_micro_batches_refused_in_the_spec(value):
    with pytest.raises(ValueError, match=rf"^micro_batches={value!r} must be a positive integer"):
        BuildSpec(model=CONFIG, micro_batches=value)


def test_micro_batches_not_dividing_the_dp_slice_refused_on_the_driver():
    pytest.importorskip("ray")
    from raytp.driver.pending import put_batch

    spec = BuildSpec(model=CONFIG, micro_batches=4)
    batch = {"input_ids": np.zeros((12, 8), dtype=np.int64)}  # 6 rows per DP group
    with pytest.raises(ValueError, match=r"^micro_batches=4 does not divide the batch size 6 of each DP"):
        put_batch(batch, 2, 2, None, 0, spec)  # refused before anything is put


def test_micro_batches_not_dividing_refused_on_a_rank():
    with pytest.raises(ValueError, match=r"^micro_batches=3 does not divide the batch size 8"):
        split({"input_ids": torch.zeros(8, 4)}, 3)


def test_cluster_trains_with_micro_batches_and_mixed_precision(ray_local, tmp_path):
    """The driver's build takes both; a batch micro_batches does not divide is refused on
    the driver; the export is written in the dtype asked for (and a bad one refused)."""
    from safetensors import safe_open

    config = GPTConfig(vocab_size=37, n_layers=1, n_heads=2, d_model=16, max_seq_len=16)
    ids = np.random.default_rng(0).integers(0, 37, (4, 8))
    with raytp.TPCluster(tp=2, device="cpu") as cluster:
        cluster.build(config, optimizer=raytp.AdamW(lr=1e-2), micro_batches=2,
                      precision=raytp.MixedPrecision())
        losses = [cluster.train_step({"input_ids": ids})["loss"] for _ in range(3)]
        assert losses[-1] < losses[0], losses
        with pytest.raises(ValueError, match=r"^micro_batches=2 does not divide the batch size 3 of each DP"):
            cluster.train_step({"input_ids": ids[:3]})
        with pytest.raises(ValueError, match=r"^export dtype='half precision' is not a torch"):
            cluster.export_hf(str(tmp_path / "bad"), dtype="half precision")
        cluster.export_hf(str(tmp_path / "hf"), dtype="bfloat16")
        assert cluster.train_step({"input_ids": ids})["loss"] < losses[-1]  # the ranks were left fine
    with safe_open(tmp_path / "hf" / "model.safetensors", "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in list(f.keys())} == {"BF16"}
    assert not (tmp_path / "bad").exists()
