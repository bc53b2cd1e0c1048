"""TPCluster end to end on CPU ranks in a local Ray: parity with one process, pipelined
phases, metrics, and the errors a user meets first."""

import re
import time

import numpy as np
import pytest
import torch.nn.functional as F

import raytp
from raytp.driver import ClusterResourceError, RankError

import nets
from nets import PLAN, Net, make_batches, reference_losses

ray = pytest.importorskip("ray")

RAY_BY_VALUE = (nets,)


@pytest.fixture(scope="module")
def cluster2(ray_local):
    with raytp.TPCluster(tp=2, device="cpu") as cluster:
        yield cluster


@pytest.mark.parametrize("optimizer", [raytp.AdamW(lr=0.01), raytp.SGD(lr=0.1, momentum=0.9)],
                         ids=["adamw", "sgd"])
def test_tp2_losses_equal_one_process(cluster2, optimizer):
    batches = make_batches(20)
    cluster2.build(Net, plan=PLAN, optimizer=optimizer, seed=0)
    losses = [cluster2.train_step(b)["loss"] for b in batches]
    np.testing.assert_allclose(losses, reference_losses(batches, optimizer), rtol=1e-10)


@pytest.mark.parametrize("tp,dp", [(4, 1), (2, 2)])
def test_more_ranks_equal_one_process(ray_local, tp, dp):
    batches = make_batches(20)
    optimizer = raytp.AdamW(lr=0.01)
    with raytp.TPCluster(tp=tp, dp=dp, device="cpu") as cluster:
        cluster.build(Net, plan=PLAN, optimizer=optimizer, seed=0)
        history = cluster.fit(batches, progress=False)
        rows = cluster.metrics()
    np.testing.assert_allclose([h["loss"] for h in history], reference_losses(batches, optimizer),
                               rtol=1e-10)
    assert len(rows) == 20 * tp * dp and {r["rank"] for r in rows} == set(range(tp * dp))
    assert all(r["samples"] == 8 // dp for r in rows)  # each DP group got its own slice


def test_metrics_rows_and_history(cluster2):
    cluster2.build(Net, plan=PLAN, seed=0)
    before = len(cluster2.history)
    summary = cluster2.train_step(make_batches(1)[0])
    assert len(cluster2.history) == before + 1
    assert summary["step_s"] > 0 and summary["samples_per_s"] > 0 and summary["tflops"] > 0
    assert summary["comm_bytes"] > 0
    assert summary["peak_mem_bytes"] > 0 and 0.0 <= summary["accuracy"] <= 1.0
    row = cluster2.metrics()[-1]
    for key in ("forward_s", "backward_s", "optim_s", "comm_s", "collectives", "grad_norm", "mfu"):
        assert key in row
    # the row-parallel forward's all-reduce and the grad norm's; the input needs no gradient,
    # so the column-parallel backward skips its all-reduce
    assert row["collectives"] == 2 and row["mfu"] is None  # no MFU without a known GPU peak


def test_phases_pipeline(cluster2):
    """Submitting steps does not wait for them: the submit loop returns long before the work ends."""

    def slow_loss(model, batch):
        time.sleep(0.05)
        return F.cross_entropy(model(batch["x"]), batch["y"])

    cluster2.build(Net, plan=PLAN, loss_fn=slow_loss, seed=0)
    batches = make_batches(20)
    t0 = time.perf_counter()
    pending = []
    for b in batches:
        cluster2.submit_forward(b)
        cluster2.submit_backward()
        pending.append(cluster2.submit_step())
    submitted = time.perf_counter() - t0
    assert not pending[-1].done()
    summaries = [p.result() for p in pending]
    finished = time.perf_counter() - t0
    assert finished > 20 * 0.05 and submitted < finished / 4, (submitted, finished)
    assert [s["step"] for s in summaries] == list(range(summaries[0]["step"], summaries[0]["step"] + 20))


def test_separate_phases_equal_one_process(cluster2):
    """forward(), backward(), step() called one by one train as train_step does."""
    batches = make_batches(5)
    optimizer = raytp.AdamW(lr=0.01)
    cluster2.build(Net, plan=PLAN, optimizer=optimizer, seed=0)
    losses = []
    for b in batches:
        cluster2.submit_forward(b)
        cluster2.submit_backward()
        losses.append(cluster2.submit_step().result()["loss"])
    np.testing.assert_allclose(losses, reference_losses(batches, optimizer), rtol=1e-10)


def test_one_object_per_dp_group_shared_by_its_tp_ranks(ray_local):
    with raytp.TPCluster(tp=2, dp=2, device="cpu") as cluster:
        cluster.build(Net, plan=PLAN, seed=0)
        batch = make_batches(1)[0]
        put = cluster.put_batch(batch)
        assert len(put.refs) == 4 and put.refs[0] == put.refs[1] and put.refs[2] == put.refs[3]
        assert put.refs[0] != put.refs[2]
        slices = ray.get([put.refs[0], put.refs[2]])
        np.testing.assert_array_equal(np.concatenate([s["x"] for s in slices]), batch["x"])


def _log_lines(actor):
    """What this rank's log handler writes for a user's logger and raytp's."""
    import io
    import logging

    stream = io.StringIO()
    previous = actor.log_handler.setStream(stream)
    try:
        logging.getLogger("user.model").warning("from the model")
        logging.getLogger("raytp.engine").info("from raytp")
        logging.getLogger("actors.telemetry").warning("from the actor")
    finally:
        actor.log_handler.setStream(previous)
    return stream.getvalue().splitlines(), repr(actor)


def test_every_log_line_names_its_rank(cluster2):
    for rank, (lines, name) in enumerate(cluster2.run(_log_lines)):
        assert lines == [f"[rank {rank}] WARNING user.model: from the model",
                         f"[rank {rank}] INFO raytp.engine: from raytp",
                         f"[rank {rank}] WARNING actors.telemetry: from the actor"]
        assert name == f"RankActor(rank {rank})"  # what Ray prefixes printed lines with


def test_evaluate_and_run(cluster2):
    cluster2.build(Net, plan=PLAN, seed=0)
    result = cluster2.evaluate(make_batches(1)[0])
    assert set(result) == {"loss", "accuracy"}
    assert cluster2.run(lambda actor: actor.mesh.tp_rank) == [0, 1]
    assert cluster2.run(lambda actor, k: actor.rank * k, 10) == [0, 10]
    assert cluster2.run(lambda actor, k: k, per_rank_args=[(5,), (7,)]) == [5, 7]


def _sp_layer_settings(actor):
    return sorted({(layer.overlap, layer.symm_mem, layer.overlap_chunks)
                   for layer in actor.engine.model.modules() if getattr(layer, "sequence_parallel", False)
                   and hasattr(layer, "symm_mem")})


def test_overlap_settings_train_the_same(cluster2):
    """build(overlap=False | True | "symm_mem") on a sequence-parallel GPT gives the same
    losses; on CPU ranks "symm_mem" falls back to the chunked path (two chunks)."""
    config = raytp.models.GPTConfig(vocab_size=37, n_layers=2, d_model=32, d_ff=48, max_seq_len=16,
                                    n_heads=4, n_kv_heads=2, dtype="float64", sequence_parallel=True)
    rng = np.random.default_rng(0)
    batches = [{"input_ids": rng.integers(0, 37, (4, 8))} for _ in range(3)]
    losses, settings = {}, {}
    for overlap in (False, True, "symm_mem"):
        cluster2.build(config, overlap=overlap, seed=0)
        losses[overlap] = [cluster2.train_step(b)["loss"] for b in batches]
        settings[overlap] = cluster2.run(_sp_layer_settings)
    assert settings["symm_mem"] == [[(True, False, 2)]] * 2
    assert settings[False] == [[(False, False, 1)]] * 2
    for overlap in (True, "symm_mem"):
        np.testing.assert_allclose(losses[overlap], losses[False], rtol=1e-12)


def test_step_before_build_and_unpicklable_factory(ray_local):
    with raytp.TPCluster(tp=1, device="cpu") as cluster:
        with pytest.raises(RuntimeError, match=r"step\(\) before build\(\)"):
            cluster.step()
        unpicklable = (i for i in range(1))  # a generator (Ray Serve makes locks picklable)
        with pytest.raises(TypeError, match="model cannot be pickled"):
            cluster.build(lambda: (unpicklable, Net())[1])


def test_rank_raising_in_forward_is_named(ray_local):
    def failing_loss(model, batch):
        if model.fc_in.mesh.tp_rank == 1:
            raise ValueError("bad batch on purpose")
        return F.cross_entropy(model(batch["x"]), batch["y"])

    with raytp.TPCluster(tp=2, device="cpu", phase_timeout_s=30) as cluster:
        cluster.build(Net, plan=PLAN, loss_fn=failing_loss)
        t0 = time.perf_counter()
        with pytest.raises(RankError, match=r"rank 1 failed in train_step: ValueError: bad batch") as e:
            cluster.train_step(make_batches(1)[0])
        assert e.value.rank == 1 and "failing_loss" in e.value.remote_traceback
        # rank 0 waits in the forward's all-reduce for rank 1, which will never come: named,
        # and the group torn down within seconds instead of hanging until the deadline
        assert time.perf_counter() - t0 < 20
        assert re.search(r"ranks \[0\] were still in train_step 5s later \(rank 0 waits in tp all_reduce "
                         r"#\d+ \(fc_out, \d+ B\) during train_step.*\), so the group was torn down: call "
                         r"recover\(\)", str(e.value)), str(e.value)
        assert cluster.actors == [] and not cluster.failures[-1]["recovered"]
        with pytest.raises(RuntimeError, match=r"lost its ranks .* call recover\(\)"):
            cluster.train_step(make_batches(1)[0])
        cluster.recover()  # no checkpoint: the model starts from its seed again
        cluster.build(Net, plan=PLAN, seed=0)
        assert np.isfinite(cluster.train_step(make_batches(1)[0])["loss"])
    # the same through the separate phases: the step's result is the forward's error
    with raytp.TPCluster(tp=2, device="cpu", phase_timeout_s=30) as cluster:
        cluster.build(Net, plan=PLAN, loss_fn=failing_loss)
        cluster.submit_forward(make_batches(1)[0])
        cluster.submit_backward()
        with pytest.raises(RankError, match=r"rank 1 failed in forward: ValueError: bad batch") as e:
            cluster.submit_step().result()
        assert "failing_loss" in e.value.remote_traceback


def test_too_many_ranks_fails_within_the_timeout(ray_local):
    t0 = time.perf_counter()
    with pytest.raises(ClusterResourceError, match="could not place tp=2 x dp=200"):
        raytp.TPCluster(tp=2, dp=200, device="cpu", timeout_s=3)
    assert time.perf_counter() - t0 < 30
    with pytest.raises(ClusterResourceError, match="needs 2 GPUs; the cluster has 0"):
        raytp.TPCluster(tp=2, device="cuda")
    assert ray.util.placement_group_table() == {} or all(
        pg["state"] == "REMOVED" for pg in ray.util.placement_group_table().values()
        if pg["bundles"] and len(pg["bundles"]) == 200)


def test_interrupt_keeps_the_cluster_usable_and_closing_leaves_nothing(ray_local):
    def interrupted(batches):
        for i, b in enumerate(batches):
            if i == 3:
                raise KeyboardInterrupt
            yield b

    with pytest.raises(KeyboardInterrupt), raytp.TPCluster(tp=2, device="cpu") as cluster:
        cluster.build(Net, plan=PLAN)
        with pytest.raises(KeyboardInterrupt):
            cluster.fit(interrupted(make_batches(10)), progress=False)
        finished = len(cluster.history)  # every step submitted before the interrupt
        assert finished >= 2 and cluster.train_step(make_batches(1)[0])["step"] == finished
        handles, pg = list(cluster.actors), cluster.group.pg
        raise KeyboardInterrupt  # interrupted again, inside the with block
    assert cluster.actors == [] and "closed" in repr(cluster)
    for handle in handles:
        with pytest.raises(ray.exceptions.RayActorError):
            ray.get(handle.node_info.remote(), timeout=30)
    assert ray.util.placement_group_table(pg)["state"] == "REMOVED"


def test_ranks_are_ordered_by_node_then_gpu_and_tp_groups_stay_whole():
    from raytp.driver.launch import rank_order

    # bundle 0 (actors 0, 1) landed on node b, bundle 1 (actors 2, 3) on node a
    b, a = {"ip": "10.0.0.2", "node_id": "b"}, {"ip": "10.0.0.1", "node_id": "a"}
    infos = [{**b, "gpu_ids": [3]}, {**b, "gpu_ids": [2]}, {**a, "gpu_ids": [1]}, {**a, "gpu_ids": [0]}]
    assert rank_order(infos, tp=2) == [3, 2, 1, 0]
    # two TP groups on one node: by their first GPU
    infos = [{"ip": "10.0.0.1", "node_id": "a", "gpu_ids": [g]} for g in (6, 7, 0, 1)]
    assert rank_order(infos, tp=2) == [2, 3, 0, 1]
    cpu = [{"ip": "10.0.0.1", "node_id": "a", "gpu_ids": []} for _ in range(4)]
    assert rank_order(cpu, tp=4) == [0, 1, 2, 3]


def test_auto_device_picks_cuda_only_with_a_gpu_per_rank(monkeypatch, caplog):
    from raytp.driver import launch

    for gpus, world, expected in [(2, 2, "cuda"), (1, 2, "cpu"), (0, 1, "cpu"), (8, 4, "cuda")]:
        monkeypatch.setattr(launch.ray, "cluster_resources", lambda g=gpus: {"CPU": 8.0, "GPU": float(g)})
        caplog.clear()
        with caplog.at_level("INFO", logger="raytp.driver.launch"):
            assert launch.resolve_device("auto", world) == expected
        assert f"device='auto': {expected} ({gpus} GPUs in the cluster for {world} ranks)" in caplog.text
    with pytest.raises(ValueError, match="device='tpu' must be 'auto', 'cuda' or 'cpu'"):
        launch.resolve_device("tpu", 2)


def test_interrupt_while_starting_leaves_nothing(ray_local, monkeypatch):
    """Ctrl-C while the ranks join (a notebook cell interrupted in TPCluster(...)): the
    actors already started and the placement group go, before the interrupt goes on."""
    from raytp.driver import launch

    started = {}
    real_rendezvous = launch.rendezvous

    def interrupted(actors, *args, **kwargs):
        started["actors"] = list(actors)
        raise KeyboardInterrupt

    before = set(ray.util.placement_group_table())  # another test's cluster may be open
    monkeypatch.setattr(launch, "rendezvous", interrupted)
    with pytest.raises(KeyboardInterrupt):
        raytp.TPCluster(tp=2, device="cpu")
    monkeypatch.setattr(launch, "rendezvous", real_rendezvous)
    assert len(started["actors"]) == 2
    for handle in started["actors"]:
        # ray.kill is asynchronous: a call sent just after it may still be served
        deadline = time.monotonic() + 30
        with pytest.raises(ray.exceptions.RayActorError):
            while time.monotonic() < deadline:
                ray.get(handle.node_info.remote(), timeout=30)
                time.sleep(0.2)
    made = {k: pg for k, pg in ray.util.placement_group_table().items() if k not in before}
    assert made and all(pg["state"] == "REMOVED" for pg in made.values()), made
