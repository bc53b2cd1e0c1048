"""Telemetry: the per-rank metrics scraped from Ray's Prometheus endpoint, a rank that
sleeps flagged as the straggler (and the rank that waits for it not), and the per-rank
phase timeline drawn as a PNG; on one TP=2 cluster of CPU ranks."""

import re
import sys
import time
import urllib.request

import pytest
import test_bad_input
import torch.nn.functional as F
from test_bad_input import PLAN, Net, net_batch

import raytp
from raytp.metrics import stragglers

ray = pytest.importorskip("ray")

# Long against what two busy cores can take from the fast rank: a rank is flagged beyond 10% of
# the step, and with 0.25 s (30 ms of a 0.3 s step) a fast rank descheduled under CI load was
# flagged too (stragglers [0, 1] in one step of a fresh-clone run).
SLEEP_S = 1.0


def sleepy_loss(model, batch):
    """TP rank 1 sleeps in the middle of its forward, after the first collective."""
    logits = model(batch["x"])
    if model.fc_in.mesh.tp_rank == 1:
        time.sleep(SLEEP_S)
    return F.cross_entropy(logits, batch["y"])


@pytest.fixture(scope="module")
def sleepy():
    """A TP=2 cluster whose rank 1 sleeps in every forward (the ranks cannot import the
    test modules: theirs are sent by value)."""
    for module in (sys.modules[__name__], test_bad_input):
        ray.cloudpickle.register_pickle_by_value(module)
    with raytp.TPCluster(tp=2, device="cpu") as cluster:
        cluster.build(Net, plan=PLAN, loss_fn=sleepy_loss, optimizer=raytp.AdamW(lr=1e-2))
        yield cluster


SAMPLE = re.compile(r'^(\w+)\{(.*)\} (\S+)$')
LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')
GAUGES = ["ray_raytp_step_seconds", "ray_raytp_tokens_per_second", "ray_raytp_loss", "ray_raytp_grad_norm",
          "ray_raytp_peak_memory_bytes", "ray_raytp_comm_bytes", "ray_raytp_comm_seconds"]


def scrape(port: int) -> list[tuple[str, dict, float]]:
    """(name, labels, value) of every raytp sample at Ray's Prometheus endpoint."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    samples = []
    for line in text.splitlines():
        match = SAMPLE.match(line)
        if match and "raytp" in match[1]:
            samples.append((match[1], dict(LABEL.findall(match[2])), float(match[3])))
    return samples


def scrape_until(port: int, ready, deadline_s: float = 45.0) -> list[tuple[str, dict, float]]:
    """Poll the endpoint until ``ready(samples)``: Ray exports every 10 s by default."""
    deadline = time.monotonic() + deadline_s
    while True:
        samples = scrape(port)
        if ready(samples) or time.monotonic() > deadline:
            return samples
        time.sleep(0.5)


def value(samples, name: str, **labels) -> float | None:
    found = [v for n, tags, v in samples if n == name and labels.items() <= tags.items()]
    return found[0] if found else None


def exported(samples, row) -> bool:
    """Whether ``samples`` show the step of ``row`` (a metrics() row) and its straggler flag."""
    rank = str(row["rank"])
    return value(samples, "ray_raytp_straggler", rank=rank) == float(row["straggler"]) and all(
        value(samples, "ray_raytp_phase_seconds", rank=rank, phase=p) == pytest.approx(row[f"{p}_s"])
        for p in ("forward", "backward", "optim"))


def test_stragglers_ignore_waits_in_collectives_and_jitter():
    fast = {"forward_s": 0.01, "backward_s": 0.01, "step_s": 0.23}
    rows = [{**fast, "optim_s": 0.21, "optim_comm_s": 0.2}, {**fast, "forward_s": 0.21, "optim_s": 0.01}]
    assert stragglers(rows) == [1]
    waits_unknown = [{k: v for k, v in r.items() if not k.endswith("comm_s")} for r in rows]
    assert stragglers(waits_unknown) == [0, 1]  # the waiting rank looks slow too
    jitter = [{**fast, "optim_s": 0.018}, {**fast, "optim_s": 0.01}]  # 8 ms more in a 230 ms step
    assert stragglers(jitter) == [] and stragglers(jitter, min_share=0) == [0]


def test_a_sleeping_rank_is_flagged_and_every_rank_exports_its_metrics(sleepy):
    cluster = sleepy
    summaries = [cluster.train_step(net_batch(seed=i)) for i in range(3)]
    assert [s["stragglers"] for s in summaries] == [[1], [1], [1]]
    rows = cluster.metrics()[-6:]
    assert [(r["rank"], r["straggler"]) for r in rows] == [(0, False), (1, True)] * 3
    assert all(r["forward_s"] > SLEEP_S for r in rows if r["rank"] == 1)
    assert all(r["optim_comm_s"] > SLEEP_S / 2 for r in rows if r["rank"] == 0)  # rank 0 waited for it
    port = ray.nodes()[0]["MetricsExportPort"]
    samples = scrape_until(port, lambda s: all(exported(s, row) for row in rows[-2:]))
    for row in rows[-2:]:
        rank = str(row["rank"])
        assert exported(samples, row), rank
        for name in GAUGES:
            assert value(samples, name, rank=rank) is not None, (name, rank)
        assert value(samples, "ray_raytp_loss", rank=rank) == pytest.approx(row["loss"])
        assert value(samples, "ray_raytp_comm_bytes", rank=rank) == row["comm_bytes"] > 0
        assert value(samples, "ray_raytp_steps_total", rank=rank) >= 3
    assert {tags["phase"] for name, tags, _ in samples if name == "ray_raytp_phase_seconds"} == {
        "forward", "backward", "optim"}


def test_timeline_png_shows_phases_per_rank_and_the_straggler(sleepy, tmp_path):
    from matplotlib.image import imread

    cluster = sleepy
    for i in range(4):
        cluster.train_step(net_batch(seed=i))
    image = imread(cluster.plot_timeline(str(tmp_path / "timeline.png"), steps=4))
    assert image.shape[0] > 200 and image.shape[1] > 1000
    colors = {tuple(int(c) for c in px) for px in (image[..., :3] * 255).reshape(-1, 3)[::7]}
    for rgb in ((0x4C, 0x72, 0xB0), (0x55, 0xA8, 0x68), (0xD6, 0x27, 0x28)):  # forward, optim, straggler
        assert any(all(abs(a - b) <= 2 for a, b in zip(rgb, c, strict=True)) for c in colors), rgb
    with pytest.raises(ValueError, match=r"^steps=0 must be a positive integer"):
        cluster.plot_timeline(str(tmp_path / "none.png"), steps=0)
