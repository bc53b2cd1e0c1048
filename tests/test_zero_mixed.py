"""Mixed precision with ZeRO-1 (``precision=MixedPrecision()``, ``AdamW(shard_over_dp=True)``)
at dp=2 x tp=2: it trains as mixed precision unsharded (bf16 compute, fp32 masters); each
rank holds half the masters and half the optimizer state; the gradients are
reduce-scattered over DP in the reduce dtype and the bf16 parameters all-gathered; a
checkpoint holds the whole fp32 masters and loads at dp=1 and dp=4 with them intact."""

import pytest
import torch
from safetensors.torch import load_file

import raytp
from raytp.comm import count_collectives
from raytp.engine import BuildSpec, build_engine
from raytp.models import GPTConfig
from raytp.zero_mixed import ShardedMixedOptimizer

import _dist
from helpers import mesh

CONFIG = GPTConfig(vocab_size=37, n_layers=2, d_model=32, d_ff=48, max_seq_len=16, norm="rmsnorm",
                   activation="swiglu", positions="rope", bias=False, tie_embeddings=False, n_heads=4,
                   n_kv_heads=1)
STEPS = 3
# measured on CPU (gloo), 3 steps: the masters equal exactly with fp32 reduction and differ by at
# most 7.5e-9 with bf16 reduction (a norm summed in another order); losses equal
MASTERS = {"rtol": 1e-6, "atol": 1e-7}
EXACT = {"rtol": 0, "atol": 0}


def _policy(reduce_dtype):
    return raytp.MixedPrecision(param_dtype="bfloat16", master_dtype="float32", reduce_dtype=reduce_dtype)


def _engine(m, shard, reduce_dtype="float32", seed=0):
    optimizer = raytp.AdamW(lr=1e-2, weight_decay=0.1, shard_over_dp=shard)
    return build_engine(m, BuildSpec(model=CONFIG, optimizer=optimizer, max_grad_norm=0.5, seed=seed,
                                     precision=_policy(reduce_dtype), micro_batches=2))


def _batch(step, m):
    ids = torch.randint(0, 37, (8, 8), generator=torch.Generator().manual_seed(step))
    return {"input_ids": ids.chunk(m.dp_size)[m.dp_rank]}


def _train(engine, steps):
    return [engine.train_step(_batch(engine.step_count, engine.mesh))["loss"] for _ in range(steps)]


def _masters(engine):
    return {name: engine.gather(name) for name, _ in engine.model.named_parameters()}


def _run(shard, reduce_dtype):
    m = mesh(2, 2)
    engine = _engine(m, shard, reduce_dtype)
    losses = _train(engine, STEPS - 1)
    with count_collectives() as counter:
        losses += _train(engine, 1)
    dp = [(r.kind, r.nbytes) for r in counter.records if r.group == "dp"]
    return {"losses": losses, "masters": _masters(engine), "dp": dp, **engine.memory_bytes(),
            "sharded": isinstance(engine.optimizer, ShardedMixedOptimizer),
            "model_dtypes": {p.dtype for p in engine.model.parameters()}}


@pytest.mark.parametrize("reduce_dtype", ["float32", "bfloat16"])
def test_mixed_sharded_trains_as_mixed_unsharded(reduce_dtype):
    plain, sharded = (_dist.run(4, _run, shard, reduce_dtype) for shard in (False, True))
    for a, b in zip(plain, sharded, strict=True):
        assert not a["sharded"] and b["sharded"] and b["model_dtypes"] == {torch.bfloat16}
        assert b["losses"] == pytest.approx(a["losses"], rel=1e-5)
        assert b["losses"][-1] < b["losses"][0]
        for name, value in a["masters"].items():
            assert b["masters"][name].dtype == torch.float32
            torch.testing.assert_close(b["masters"][name], value, msg=lambda m, n=name: f"{n}: {m}",
                                       **MASTERS)
        for key in ("master_bytes", "optimizer_bytes"):  # half of each TP shard's, per DP rank
            assert 0.45 < b[key] / a[key] < 0.55, (key, b[key], a[key])
        kinds = [kind for kind, _ in b["dp"]]
        assert "all_reduce" not in [kind for kind, n in b["dp"] if n > 8]  # only the norm's square
        assert kinds.count("reduce_scatter") == kinds.count("all_gather") >= 1
        scattered = sum(n for kind, n in b["dp"] if kind == "reduce_scatter")
        gathered = sum(n for kind, n in b["dp"] if kind == "all_gather")
        grad_size = 4 if reduce_dtype == "float32" else 2  # a rank sends all its gradients, dp=2 halves
        assert scattered / gathered == pytest.approx(2 * grad_size / 2, rel=0.01), b["dp"]  # bf16 gathered


def _save_continue(path):
    m = mesh(2, 2)
    engine = _engine(m, True)
    _train(engine, 3)
    masters = _masters(engine)
    raytp.checkpoint.save(path, engine.weights, engine.optimizer, m, step=engine.step_count)
    return {"masters": masters, "losses": _train(engine, 2)}


def _load(path, again, tp, dp, shard):
    m = mesh(tp, dp)
    engine = _engine(m, shard, seed=1)  # other weights: the checkpoint must replace them
    engine.load_checkpoint(path)
    masters = _masters(engine)
    raytp.checkpoint.save(again, engine.weights, engine.optimizer, m, step=engine.step_count)
    return {"masters": masters, "losses": _train(engine, 2),
            "sharded": isinstance(engine.optimizer, ShardedMixedOptimizer)}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    path = tmp_path_factory.mktemp("zero-mixed") / "ckpt"
    return path, _dist.run(4, _save_continue, str(path))


@pytest.mark.parametrize(("tp", "dp", "shard"), [(2, 2, True), (2, 1, True), (1, 4, True), (2, 2, False)])
def test_checkpoint_keeps_the_fp32_masters_at_any_dp(saved, tmp_path, tp, dp, shard):
    path, runs = saved
    for name, tensor in load_file(path / "rank-00000-of-00002.safetensors").items():
        if name.startswith(("model/", "optim/")) and tensor.dim():
            assert tensor.dtype == torch.float32, name  # the masters and their state, not bf16
    again = tmp_path / "again"
    out = _dist.run(tp * dp, _load, str(path), str(again), tp, dp, shard)
    for rank, mine in enumerate(out):
        assert mine["sharded"] == (shard and dp > 1)
        for name, value in runs[0]["masters"].items():  # tp=1 has no vocabulary padding
            torch.testing.assert_close(mine["masters"][name], value[:mine["masters"][name].shape[0]],
                                       msg=lambda m, n=name: f"{n}: {m}", **EXACT)
        if (tp, dp) == (2, 2):  # the same DP halves as the run that saved: the same losses
            assert mine["losses"] == runs[rank]["losses"]
    if tp == 2:  # saved again as it was loaded: the same files (masters and optimizer state)
        for name in ("rank-00000-of-00002.safetensors", "rank-00001-of-00002.safetensors"):
            first, second = load_file(path / name), load_file(again / name)
            assert first.keys() == second.keys()
            for key in first:
                if not key.startswith("rng/"):
                    torch.testing.assert_close(second[key], first[key], msg=key, **EXACT)


def _dp1_messages():
    import logging

    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("raytp.zero")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        built = [type(_engine(mesh(2, 1), True, seed=0).optimizer).__name__,
                 type(build_engine(mesh(2, 1), BuildSpec(model=CONFIG, optimizer=raytp.AdamW(
                     shard_over_dp=True))).optimizer).__name__]
    finally:
        logger.removeHandler(handler)
    return built, [r.getMessage() for r in records]


def test_shard_over_dp_at_dp1_is_allowed_and_logged():
    (built, messages), (_, other) = _dist.run(2, _dp1_messages)
    assert built == ["AdamW", "AdamW"]  # the plain optimizer, with and without mixed precision
    assert messages == ["shard_over_dp=True at dp=1: nothing to shard; the plain AdamW is used"] * 2
    assert other == []  # logged once, from global rank 0
