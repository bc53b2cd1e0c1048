"""Optimizer-state sharding over DP (ZeRO-1): dp=2 x tp=2 trains exactly as the unsharded
AdamW (float64, 5 steps, clipping on, a key/value head shared by the TP ranks); the DP
gradients are reduce-scattered and the parameters all-gathered instead of all-reduced;
each rank holds half the optimizer state; a checkpoint saved sharded at dp=2 holds the
unsharded state and loads at dp=1 and dp=4 (and unsharded <-> sharded)."""

import json

import pytest
import torch

import raytp
from raytp.comm import count_collectives
from raytp.engine import BuildSpec, build_engine
from raytp.models import GPTConfig
from raytp.zero import ShardedOptimizer, unsharded

import _dist
from helpers import mesh

CONFIG = GPTConfig(vocab_size=37, n_layers=2, d_model=32, d_ff=48, max_seq_len=16, dtype="float64",
                   norm="rmsnorm", activation="swiglu", positions="rope", bias=False, tie_embeddings=False,
                   n_heads=4, n_kv_heads=1)
EXACT = {"rtol": 1e-12, "atol": 1e-15}
PARITY = {"rtol": 1e-9, "atol": 1e-11}  # float64: a batch split otherwise over DP rounds otherwise
STEPS, N_BEFORE, K_AFTER = 5, 3, 2


def _batch(step, m):
    ids = torch.randint(0, 37, (4, 8), generator=torch.Generator().manual_seed(step))
    return {"input_ids": ids.chunk(m.dp_size)[m.dp_rank]}


def _engine(m, shard, seed=0):
    optimizer = raytp.AdamW(lr=1e-2, weight_decay=0.1, shard_over_dp=shard)
    return build_engine(m, BuildSpec(model=CONFIG, optimizer=optimizer, max_grad_norm=0.05, seed=seed))


def _full_params(engine):
    return {name: engine.gather(name) for name, _ in engine.model.named_parameters()}


def _train(engine, steps):
    return [engine.train_step(_batch(engine.step_count, engine.mesh))["loss"] for _ in range(steps)]


def _steps(shard):
    m = mesh(2, 2)
    engine = _engine(m, shard)
    engine.forward(_batch(0, m))
    engine.backward()
    with count_collectives() as counter:
        first = engine.step()
    losses = [first["loss"], *_train(engine, STEPS - 1)]
    dp = [(r.kind, r.nbytes) for r in counter.records if r.group == "dp"]
    return {"params": _full_params(engine), "losses": losses, "dp": dp, "norm": first["grad_norm"],
            "optimizer_bytes": engine.memory_bytes()["optimizer_bytes"],
            "sharded": isinstance(engine.optimizer, ShardedOptimizer)}


def test_sharded_adamw_equals_unsharded():
    plain, sharded = (_dist.run(4, _steps, shard) for shard in (False, True))
    for a, b in zip(plain, sharded, strict=True):
        assert not a["sharded"] and b["sharded"]
        assert a["losses"] == pytest.approx(b["losses"], rel=1e-12)
        assert a["norm"] == pytest.approx(b["norm"], rel=1e-12)
        for name, value in a["params"].items():
            torch.testing.assert_close(b["params"][name], value, msg=lambda m, n=name: f"{n}: {m}", **EXACT)
        grad_bytes = max(n for kind, n in a["dp"] if kind == "all_reduce")
        assert [kind for kind, _ in a["dp"]] == ["all_reduce"]  # the DP mean of all gradients
        kinds = [kind for kind, _ in b["dp"]]
        assert kinds.count("reduce_scatter") == kinds.count("all_gather") >= 1
        assert all(n == 8 for kind, n in b["dp"] if kind == "all_reduce")  # the norm's square only
        scattered = sum(n for kind, n in b["dp"] if kind == "reduce_scatter")
        assert scattered == pytest.approx(grad_bytes, rel=0.01)
        assert 0.45 < b["optimizer_bytes"] / a["optimizer_bytes"] < 0.55, (b["optimizer_bytes"],
                                                                              a["optimizer_bytes"])


def _tiny(shard):
    """A 3-element model at dp=4: the last DP rank owns no element of it."""
    m = mesh(1, 4)
    torch.manual_seed(0)
    model = torch.nn.Linear(2, 1).double()
    optimizer = raytp.SGD(lr=0.1, momentum=0.9, shard_over_dp=shard).build(model.parameters(), mesh=m)
    for step in range(3):
        x = torch.randn(4, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(step))
        model(x[m.dp_rank:m.dp_rank + 1]).pow(2).sum().backward()
        if shard:
            optimizer.sync_grads_and_norm(None)
        else:
            raytp.sync_grads(model, m)
        optimizer.step()
        optimizer.zero_grad()
    full = unsharded(optimizer)
    return [p.detach().clone() for p in model.parameters()], [full.state[p]["momentum_buffer"]
                                                                for p in model.parameters()]


def test_a_rank_may_own_nothing():
    sharded, plain = _dist.run(4, _tiny, True), _dist.run(4, _tiny, False)
    for (params, moments), (ref_params, ref_moments) in zip(sharded, plain, strict=True):
        for a, b in zip(params + moments, ref_params + ref_moments, strict=True):
            torch.testing.assert_close(a, b, **EXACT)


def test_shard_over_dp_is_checked():
    with pytest.raises(ValueError, match="shard_over_dp='yes'"):
        raytp.AdamW(shard_over_dp="yes")
    with pytest.raises(ValueError, match="needs the mesh"):
        raytp.SGD(shard_over_dp=True).build([torch.nn.Parameter(torch.zeros(3))])


def _save_continue(path, shard):
    m = mesh(2, 2)
    engine = _engine(m, shard)
    _train(engine, N_BEFORE)
    raytp.checkpoint.save(path, engine.model, engine.optimizer, m, step=engine.step_count)
    losses = _train(engine, K_AFTER)
    return {"params": _full_params(engine), "losses": losses}


def _load_continue(path, tp, dp, shard):
    m = mesh(tp, dp)
    engine = _engine(m, shard, seed=1)  # other weights: the checkpoint must replace them
    engine.load_checkpoint(path)
    losses = _train(engine, K_AFTER)
    return {"params": _full_params(engine), "losses": losses,
            "sharded": isinstance(engine.optimizer, ShardedOptimizer)}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    out = {}
    for shard in (False, True):
        path = tmp_path_factory.mktemp("zero") / f"shard-{shard}"
        out[shard] = (path, _dist.run(4, _save_continue, str(path), shard))
    return out


def test_sharded_checkpoint_holds_the_unsharded_state(saved):
    (plain, _), (sharded, _) = saved[False], saved[True]
    a, b = (json.loads((p / "checkpoint.json").read_text()) for p in (plain, sharded))
    assert a["optimizer"] == b["optimizer"] and a["optimizer"]["class"] == "AdamW"
    from safetensors.torch import load_file

    for name in a["files"]:
        x, y = load_file(plain / name), load_file(sharded / name)
        assert x.keys() == y.keys()
        for key in x:
            if not key.startswith("rng/"):
                torch.testing.assert_close(y[key], x[key], msg=lambda m, k=key: f"{k}: {m}", **EXACT)


@pytest.mark.parametrize(("tp", "dp", "shard"), [(2, 2, True), (2, 1, True), (1, 4, True), (2, 2, False)])
@pytest.mark.parametrize("saved_sharded", [True, False])
def test_checkpoint_loads_at_any_dp(saved, tp, dp, shard, saved_sharded):
    path, continued = saved[saved_sharded]
    expected = continued[0]
    for rank, out in enumerate(_dist.run(tp * dp, _load_continue, str(path), tp, dp, shard)):
        assert out["sharded"] == (shard and dp > 1)
        if (tp, dp) == (2, 2):  # the same DP halves as the run that saved (sharded or not)
            assert out["losses"] == pytest.approx(saved[not saved_sharded][1][rank]["losses"], rel=1e-12)
        for name, value in expected["params"].items():
            mine = out["params"][name]  # tp=1 has no vocabulary padding
            torch.testing.assert_close(mine, value[:mine.shape[0]], msg=lambda m, n=name: f"{n}: {m}",
                                       **PARITY)


def test_driver_builds_sharded_checkpointed_ranks(ray_local, tmp_path):
    """TPCluster.build(optimizer=AdamW(shard_over_dp=True), activation_checkpointing="full")
    trains as the plain build (dropout on), saves and loads; a pattern that matches
    nothing fails the build naming it, on the driver."""
    config = GPTConfig(**{**vars(CONFIG), "dropout": 0.1})
    batches = [{"input_ids": torch.randint(0, 37, (4, 8), generator=torch.Generator().manual_seed(s)).numpy()}
               for s in range(4)]
    losses = {}
    with raytp.TPCluster(tp=1, dp=2, device="cpu") as cluster:
        for shard in (False, True):
            cluster.build(config, optimizer=raytp.AdamW(lr=1e-2, shard_over_dp=shard), seed=0,
                          activation_checkpointing="full" if shard else None)
            losses[shard] = [cluster.train_step(b)["loss"] for b in batches[:3]]
        cluster.save(str(tmp_path / "ckpt"))
        after = cluster.train_step(batches[3])["loss"]
        cluster.build(config, optimizer=raytp.AdamW(lr=1e-2), seed=3)
        cluster.load(str(tmp_path / "ckpt"))
        assert cluster.train_step(batches[3])["loss"] == pytest.approx(after, rel=1e-12)
        with pytest.raises(ValueError, match="'layer.*' matches no submodule"):  # on the driver
            cluster.build(config, activation_checkpointing={"layer.*": "full"})
    assert losses[True] == pytest.approx(losses[False], rel=1e-12)
