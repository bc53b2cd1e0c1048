"""Bad input, refused with a clear error: a table of cases, each with the exception and a
regex of its message, run on one TP=2 cluster of CPU ranks in the local Ray that raytp
starts itself; after each, a valid training step still runs on the same cluster. Also,
on the same cluster (one Ray start for all: the suite must stay fast): on_nan="skip";
token authentication and the dashboard of that Ray. The telemetry tests
(tests/test_telemetry.py) use this module's models.

(A pickle-bearing ``pytorch_model.bin`` given to ``raytp.models.from_pretrained`` is
refused, without being unpickled, in tests/test_hf_load.py::test_pickles_and_unknown_models_are_refused.)
"""

import math
import os
import shutil
import socket
import sys
import time
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import raytp
from raytp.checkpoint import CheckpointError
from raytp.driver import ClusterResourceError, RankError
from raytp.models import BertConfig, GPTConfig
from raytp.validate import ClassifierInputs, classifier_inputs

ray = pytest.importorskip("ray")

ROOT = Path(__file__).parents[1]
PLAN = {"fc_in": "colwise", "fc_out": "rowwise"}
GPT_SIZES = {"vocab_size": 37, "n_layers": 1, "n_heads": 2, "d_model": 16, "max_seq_len": 16}


def gpt(**change) -> GPTConfig:
    return GPTConfig(**{**GPT_SIZES, **change}, norm="rmsnorm", activation="swiglu", positions="rope",
                     bias=False)


GPT = gpt()


class Net(nn.Module):
    def __init__(self, hidden=32):
        super().__init__()
        self.fc_in = nn.Linear(12, hidden, dtype=torch.float64)
        self.fc_out = nn.Linear(hidden, 5, dtype=torch.float64)

    def forward(self, x):
        return self.fc_out(torch.tanh(self.fc_in(x)))


def odd_net():
    return Net(hidden=33)


def nan_when_flagged(model, batch):
    loss = F.cross_entropy(model(batch["x"]), batch["y"])
    return loss * float("nan") if bool(batch["flag"][0]) else loss


def net_batch(n=8, seed=None, **change):
    rng = np.random.default_rng(n if seed is None else seed)
    return {"x": rng.standard_normal((n, 12)), "y": rng.integers(0, 5, n), **change}


def gpt_batch(shape=(4, 8), **change):
    return {"input_ids": np.random.default_rng(1).integers(0, 37, shape), **change}


def put(array, at, value):
    array = np.array(array)
    array[at] = value
    return array


MODELS = {  # the builds the cases run on
    "net": {"model": Net, "plan": PLAN},
    "gpt": {"model": GPT},
    "gpt_sp": {"model": gpt(sequence_parallel=True)},
    "nan_raise": {"model": Net, "plan": PLAN, "loss_fn": nan_when_flagged},
    "nan_skip": {"model": Net, "plan": PLAN, "loss_fn": nan_when_flagged, "on_nan": "skip"},
    "gpt_vocab41": {"model": gpt(vocab_size=41)},
    "bert": {"model": BertConfig(vocab_size=37, n_layers=1, n_heads=2, d_model=16, max_seq_len=16),
             "loss_fn": lambda model, batch: model(batch["input_ids"]).pow(2).mean()},
}
VALID = {"net": net_batch(), "gpt": gpt_batch(), "gpt_sp": gpt_batch(),
         "nan_raise": net_batch(flag=np.zeros(8, int)), "nan_skip": net_batch(flag=np.zeros(8, int))}


class Ranks:
    """The module's cluster and the model built on it now."""

    def __init__(self, cluster, started_ray: bool):
        self.cluster, self.started_ray, self.model = cluster, started_ray, None

    def use(self, name: str):
        if self.model != name:
            self.cluster.build(optimizer=raytp.AdamW(lr=1e-2), **MODELS[name])
            self.model = name
        return self.cluster


def _more_dp_groups_than_fit() -> int:
    """More DP groups of two CPU ranks (0.01 CPU each) than this Ray cluster holds."""
    return int(ray.cluster_resources()["CPU"] / 0.02) + 10


@pytest.fixture(scope="module")
def ranks():
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the ranks cannot import this module
    started = not ray.is_initialized()
    with raytp.TPCluster(tp=2, device="cpu") as cluster:  # raytp starts the local Ray itself
        yield Ranks(cluster, started)


@pytest.fixture(scope="module")
def unbuilt_dp2(ranks):
    with raytp.TPCluster(tp=1, dp=2, device="cpu") as cluster:
        yield cluster


@pytest.fixture(scope="module")
def checkpoints(ranks, tmp_path_factory):
    root = tmp_path_factory.mktemp("checkpoints")
    for name in ("gpt", "gpt_vocab41"):
        cluster = ranks.use(name)
        cluster.train_step(gpt_batch())
        cluster.save(str(root / name))
    (root / "pickled").mkdir()
    torch.save({"weight": torch.zeros(2)}, root / "pickled" / "pytorch_model.bin")
    return root


def damaged(ctx, how: str) -> str:
    """A copy of the GPT checkpoint with TP rank 1's shard corrupted (same size) or truncated."""
    path = ctx["tmp"] / how
    shutil.copytree(ctx["checkpoints"] / "gpt", path)
    shard = path / "rank-00001-of-00002.safetensors"
    data = bytearray(shard.read_bytes())
    if how == "corrupt":
        data[len(data) // 2] ^= 0xFF
    else:
        data = data[:-100]
    shard.write_bytes(bytes(data))
    return str(path)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def unreachable(address: str):
    t0 = time.perf_counter()
    try:
        raytp.TPCluster(tp=2, device="cpu", address=address)
    finally:
        assert time.perf_counter() - t0 < 15  # ray.init itself waits 30 s to minutes


class Case(NamedTuple):
    id: str
    model: str | None  # the build the action runs on (None: whatever is built)
    action: Any  # action(cluster, ctx) must raise
    error: type
    match: str
    needs: tuple = ()  # module fixtures the action reads from ctx, made before the model is built


def train(batch):
    return lambda cluster, ctx: cluster.train_step(batch)


def build(**kwargs):
    return lambda cluster, ctx: cluster.build(**kwargs)


# A generator cannot be pickled anywhere (a lock could: Ray Serve registers a serializer
# for locks in every process that imports it, as a pytest worker may have).
UNPICKLABLE = (i for i in range(1))


def unpicklable_loss(model, batch, _held=UNPICKLABLE):
    return F.cross_entropy(model(batch["x"]), batch["y"])


CKPT, DP2 = ("checkpoints",), ("unbuilt_dp2",)
IDS_37 = r"the vocabulary has 37 ids \(0 to 36\)"
CASES = [
    # sizes tp does not divide: named on the driver for a raytp config, by every rank for a plan
    Case("gpt heads", "gpt", build(model=gpt(n_heads=3, d_model=24)), ValueError,
         r"^n_heads=3, n_kv_heads=3, tp=2: n_heads must be divisible by tp"),
    Case("gpt d_ff", "gpt", build(model=gpt(d_ff=33)), ValueError,
         r"^d_ff=33 is not divisible by tp=2$"),
    Case("gpt kv heads", "gpt", build(model=gpt(n_heads=6, n_kv_heads=3, d_model=24)),
         ValueError, r"^n_heads=6, n_kv_heads=3, tp=2: .* n_kv_heads must divide tp or be a multiple of it"),
    Case("plan on an odd layer", "net", build(model=odd_net, plan=PLAN), RankError,
         r"^rank \d failed in build: ValueError: 'fc_in' \(colwise\): out_features=33 is not divisible "
         r"by tp=2"),
    # ids and labels
    Case("id >= vocab", "gpt", train(gpt_batch(input_ids=put(gpt_batch()["input_ids"], (1, 3), 37))),
         ValueError, r"^input_ids contains 37 at \[1, 3\]; " + IDS_37),
    Case("negative id", "gpt", train(gpt_batch(input_ids=put(gpt_batch()["input_ids"], (3, 0), -1))),
         ValueError, r"^input_ids contains -1 at \[3, 0\]; " + IDS_37),
    Case("label >= vocab", "gpt", train(gpt_batch(labels=put(np.full((4, 8), -100), (2, 5), 40))),
         ValueError, r"^labels contains 40 at \[2, 5\]; a label is a token id in \[0, 37\) or -100 "
         r"\(ignored\)$"),
    Case("negative label", "gpt", train(gpt_batch(labels=put(np.zeros((4, 8), int), (0, 7), -5))),
         ValueError, r"^labels contains -5 at \[0, 7\]; a label is a token id"),
    Case("bert token type", "bert", train(gpt_batch(token_type_ids=put(np.zeros((4, 8), int), (0, 1), 2))),
         ValueError, r"^token_type_ids contains 2 at \[0, 1\]; there are 2 token types$"),
    Case("class >= classes", "net", train(net_batch(y=put(np.zeros(8, int), 3, 5))), ValueError,
         r"^y contains 5 at \[3\]; the model's last layer 'fc_out' has 5 classes \(0 to 4\)"),
    # shapes and dtypes that do not match the model
    Case("float input_ids", "gpt", train({"input_ids": np.zeros((4, 8))}), ValueError,
         r"^input_ids has dtype float64; token ids must be integers$"),
    Case("1-D input_ids", "gpt", train({"input_ids": np.zeros(8, int)}), ValueError,
         r"^input_ids has shape \(8,\); it must be \(batch, seq_len\)$"),
    Case("longer than max_seq_len", "gpt", train(gpt_batch((4, 17))), ValueError,
         r"^input_ids has sequence length 17; the model takes 1 to max_seq_len=16 positions$"),
    Case("labels shape", "gpt", train(gpt_batch(labels=np.zeros((4, 7), int))), ValueError,
         r"^labels has shape \(4, 7\); it must have the shape of input_ids, \(4, 8\)$"),
    Case("seq len vs tp under SP", "gpt_sp", train(gpt_batch((4, 7))), ValueError,
         r"^input_ids has sequence length 7, not divisible by tp=2: sequence_parallel=True splits"),
    Case("no input_ids", "gpt", train({"ids": gpt_batch()["input_ids"]}), ValueError,
         r"^the batch has no 'input_ids' \(its keys: \['ids'\]\); a GPT reads input_ids"),
    Case("x feature count", "net", train(net_batch(x=np.zeros((8, 13)))), ValueError,
         r"^x has 13 features \(shape \(8, 13\)\); the model's first layer 'fc_in' takes 12$"),
    Case("integer x", "net", train(net_batch(x=np.zeros((8, 12), int))), ValueError,
         r"^x has dtype int64; the model's first layer 'fc_in' takes floating-point inputs$"),
    Case("no y", "net", train({"x": net_batch()["x"]}), ValueError,
         r"^the batch has no 'y' \(its keys: \['x'\]\); the default loss reads 'x' and 'y'"),
    Case("empty dict", "net", train({}), ValueError, r"^a batch is a non-empty dict of arrays, got \{\}"),
    Case("batch size 0", "net", train(net_batch(0)), ValueError,
         r"^the batch is empty: batch size 0 \(x \(0, 12\), y \(0,\)\)$"),
    Case("different batch sizes", "net", train(net_batch(y=np.zeros(7, int))), ValueError,
         r"^batch entries have different batch sizes: \{'x': 8, 'y': 7\}$"),
    Case("scalar entry", "net", train(net_batch(lr=0.1)), ValueError,
         r"^batch\['lr'\] is a scalar; every entry needs a batch dimension$"),
    Case("string entry", "net", train(net_batch(note=np.array(["a"] * 8))), ValueError,
         r"^batch\['note'\] has dtype <U1; batch entries must be numeric arrays$"),
    Case("batch size vs dp", None, lambda cluster, ctx: ctx["unbuilt_dp2"].train_step(net_batch(5)),
         ValueError,
         r"^batch size 5 is not divisible by dp=2: each DP group takes an equal slice$", DP2),
    # non-finite inputs (on the driver) and a non-finite loss (on the ranks, before the optimizer step)
    Case("nan input", "net", train(net_batch(x=put(net_batch()["x"], (2, 4), np.nan))), ValueError,
         r"^batch\['x'\] contains nan at \[2, 4\]; inputs must be finite$"),
    Case("inf input", "net", train(net_batch(x=put(net_batch()["x"], (6, 0), -np.inf))), ValueError,
         r"^batch\['x'\] contains -inf at \[6, 0\]; inputs must be finite$"),
    Case("nan loss", "nan_raise", train(net_batch(flag=np.ones(8, int))), RankError,
         r"^rank \d failed in train_step: NonFiniteLoss: loss is nan at step 0; the optimizer step was "
         r"not taken"),
    Case("on_nan value", "net", build(model=Net, plan=PLAN, on_nan="ignore"), ValueError,
         r"^on_nan='ignore' must be one of \('raise', 'skip'\)$"),
    Case("overlap value", "net", build(model=Net, plan=PLAN, overlap="fused"), ValueError,
         r"^overlap='fused' must be one of \(None, False, True, 'symm_mem'\)$"),
    # checkpoints
    Case("missing checkpoint", "gpt", lambda cluster, ctx: cluster.load(str(ctx["tmp"] / "none")),
         CheckpointError, r"none is not a raytp checkpoint: checkpoint\.json is missing$"),
    Case("another model's checkpoint", "gpt",
         lambda cluster, ctx: cluster.load(str(ctx["checkpoints"] / "gpt_vocab41")), RankError,
         r"^rank \d failed in load: CheckpointError: the model's config differs from the checkpoint's: "
         r"vocab_size: saved 41, model 37\n", CKPT),
    Case("corrupt shard", "gpt", lambda cluster, ctx: cluster.load(damaged(ctx, "corrupt")), CheckpointError,
         r"rank-00001-of-00002\.safetensors is corrupt: its sha256 differs from the index's$", CKPT),
    Case("truncated shard", "gpt", lambda cluster, ctx: cluster.load(damaged(ctx, "truncated")),
         CheckpointError, r"rank-00001-of-00002\.safetensors has \d+ bytes; the index records \d+ "
         r"\(truncated or replaced\?\)$", CKPT),
    Case("pickle checkpoint", "gpt", lambda cluster, ctx: cluster.load(str(ctx["checkpoints"] / "pickled")),
         CheckpointError, r"pytorch_model\.bin: a pickle checkpoint; raytp does not load it, because "
         r"unpickling runs whatever code the file holds", CKPT),
    # build() and the constructor
    Case("negative lr", "net", lambda cluster, ctx: cluster.build(Net, optimizer=raytp.AdamW(lr=-1e-3)),
         ValueError, r"^AdamW: lr=-0.001 must be >= 0$"),
    Case("unpicklable loss_fn", "net", build(model=Net, plan=PLAN, loss_fn=unpicklable_loss), TypeError,
         r"^loss_fn cannot be pickled, so it cannot be sent to the ranks: TypeError: cannot pickle "
         r"'generator' object$"),
    Case("unpicklable factory", "net",
         lambda cluster, ctx: cluster.build(lambda: (ctx["unpicklable"], Net())[1], plan=PLAN), TypeError,
         r"^model cannot be pickled, so it cannot be sent to the ranks"),
    Case("neither config nor callable", "net", build(model=42), TypeError,
         r"^model must be a raytp model config or a zero-argument callable, got int$"),
    Case("unreachable ray:// address", None, lambda cluster, ctx: unreachable("ray://127.0.0.1:1"),
         ConnectionError, r"^cannot reach the Ray cluster at 'ray://127\.0\.0\.1:1': Connection refused"),
    Case("unused port", None, lambda cluster, ctx: unreachable(f"127.0.0.1:{free_port()}"),
         ConnectionError, r"^cannot reach the Ray cluster at '127\.0\.0\.1:\d+': Connection refused"),
    Case("more ranks than the cluster places", None,
         lambda cluster, ctx: raytp.TPCluster(tp=2, dp=_more_dp_groups_than_fit(), device="cpu", timeout_s=1),
         ClusterResourceError,
         r"^could not place tp=2 x dp=\d+ ranks \(\d+ bundles of \{'CPU': 0\.02\}\) within 1s"),
    Case("device tpu", None, lambda cluster, ctx: raytp.TPCluster(tp=2, device="tpu"), ValueError,
         r"^device='tpu' must be 'auto', 'cuda' or 'cpu'$"),
    Case("backend mpi", None, lambda cluster, ctx: raytp.TPCluster(tp=2, backend="mpi"), ValueError,
         r"^backend='mpi' must be one of \('auto', 'torch', 'cupy-nccl'\)$"),
    Case("tp=0", None, lambda cluster, ctx: raytp.TPCluster(tp=0), ValueError,
         r"^tp=0 must be a positive integer$"),
    Case("step before build", None, lambda cluster, ctx: ctx["unbuilt_dp2"].step(), RuntimeError,
         r"^step\(\) before build\(\): call cluster.build\(model, \.\.\.\) first$", DP2),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_refused_and_the_cluster_goes_on(ranks, request, tmp_path, case):
    ctx = {"tmp": tmp_path, "unpicklable": (i for i in range(1))}
    ctx.update((name, request.getfixturevalue(name)) for name in case.needs)  # before ranks.use: they build
    if case.model:
        ranks.use(case.model)
    with pytest.raises(case.error, match=case.match):
        case.action(ranks.cluster, ctx)
    if ranks.model not in VALID:
        ranks.use("net")
    assert math.isfinite(ranks.cluster.train_step(VALID[ranks.model])["loss"])


def test_the_table_is_long_enough():
    assert len(CASES) >= 25 and len({c.id for c in CASES}) == len(CASES)


class HeadFirst(nn.Module):  # registers its last layer first: the order of use is unknown
    def __init__(self):
        super().__init__()
        self.head = nn.Linear(32, 5)
        self.body = nn.Linear(12, 32)


def test_classifier_checks_only_what_the_layers_tell():
    assert classifier_inputs(Net()) == ClassifierInputs(12, 5, "fc_in", "fc_out")
    embedding_first = nn.Sequential(nn.Embedding(100, 12), nn.Linear(12, 5))  # x holds integer ids
    for model in (embedding_first, HeadFirst()):
        checker = classifier_inputs(model)
        assert checker == ClassifierInputs()
        checker.validate_batch({"x": np.zeros((8, 3), int), "y": np.zeros((8, 3), int)}, 2)  # passes
        with pytest.raises(ValueError, match=r"^the batch has no 'y' \(its keys: \['x'\]\)"):
            checker.validate_batch({"x": np.zeros((8, 3), int)}, 2)


def _weights(actor):
    return [p.detach().clone() for p in actor.engine.model.parameters()]


def test_nan_loss_skipped_without_touching_the_weights(ranks):
    cluster = ranks.use("nan_skip")
    before = cluster.run(_weights)
    skipped = cluster.train_step(net_batch(flag=np.ones(8, int)))
    assert skipped["skipped"] is True and math.isnan(skipped["loss"])
    for mine, theirs in zip(before, cluster.run(_weights), strict=True):
        for a, b in zip(mine, theirs, strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert [r["skipped"] for r in cluster.metrics()[-2:]] == [True, True]
    after = cluster.train_step(VALID["nan_skip"])
    assert after["skipped"] is False and after["step"] == skipped["step"] + 1
    assert not torch.equal(before[0][0], cluster.run(_weights)[0][0])  # this step did update them


# -- security -----------------------------------------------------------------------------


def _auth_env(actor):
    return os.environ.get("RAY_AUTH_MODE")


def test_the_ray_raytp_starts_has_token_auth_and_no_dashboard(ranks):
    if not ranks.started_ray:
        pytest.skip("Ray was already running in this process, so raytp did not start it")
    auth = pytest.importorskip("ray._private.authentication.authentication_utils",
                               reason="this Ray has no token authentication module to ask")
    assert auth.is_token_auth_enabled()
    assert ranks.cluster.run(_auth_env) == ["token", "token"]  # the ranks' processes too
    node = ray._private.worker.global_worker.node
    assert not node.address_info.get("webui_url")  # include_dashboard=False: no dashboard at all
