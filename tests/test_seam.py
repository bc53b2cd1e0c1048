"""The driver-rank seam: who owns what, one verb to the ranks, the rank built by the core
(the same under torchrun as in a rank actor), inference-only ranks, and parameters
gathered from their DTensor views."""

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import raytp
from raytp.driver import RankError
from raytp.engine import BuildSpec, InferenceOnly

import nets
from nets import PLAN, Net

ray = pytest.importorskip("ray")

ROOT = Path(__file__).parents[1]
def make_batch(n=8, seed=0):
    rng = np.random.default_rng(seed)
    return {"x": rng.standard_normal((n, 12)), "y": rng.integers(0, 5, n)}


def _example(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


RAY_BY_VALUE = (nets,)


@pytest.fixture(scope="module")
def cluster2(ray_local):
    with raytp.TPCluster(tp=2, device="cpu") as cluster:
        yield cluster


# -- owners ------------------------------------------------------------------------------

PRIVATE = re.compile(r"\bcluster\._[a-z]\w*")


def test_only_cluster_py_touches_the_clusters_private_state():
    """Pending, recovery, checkpointing and the fit loop reach TPCluster through its
    public methods and its RankGroup / StepLog; cluster.py stays under 300 lines."""
    sources = [p for d in ("raytp", "actors") for p in (ROOT / d).rglob("*.py")]
    offenders = {str(p.relative_to(ROOT)): PRIVATE.findall(p.read_text())
                 for p in sources if p.name != "cluster.py" or p.parent.name != "driver"}
    assert {p: found for p, found in offenders.items() if found} == {}
    assert len(sources) > 50 and PRIVATE.findall("cluster._drain(); self.cluster._wait(x)") == [
        "cluster._drain", "cluster._wait"]  # the pattern does see private access
    lines = len((ROOT / "raytp/driver/cluster.py").read_text().splitlines())
    assert lines < 300, lines


def test_rank_actor_has_one_verb_and_no_phase_pass_throughs():
    from actors import RankActor

    phases = {"forward", "backward", "step", "train_step", "evaluate", "save", "load", "export_hf",
              "loop_train_steps", "call"}
    assert phases.isdisjoint(vars(RankActor)), phases & set(vars(RankActor))
    assert callable(RankActor.execute)


# -- the spec ----------------------------------------------------------------------------

def test_build_spec_is_frozen_and_validated_once():
    spec = BuildSpec(model=Net, plan=PLAN)
    with pytest.raises(AttributeError):
        spec.seed = 1
    for kwargs, error, match in [
        ({"on_nan": "ignore"}, ValueError, r"^on_nan='ignore' must be one of"),
        ({"overlap": "fused"}, ValueError, r"^overlap='fused' must be one of"),
        ({"max_grad_norm": 0.0}, ValueError, r"^max_grad_norm=0.0 must be positive"),
        ({"seed": 1.5}, TypeError, r"^seed=1.5 must be an integer"),
        ({"plan": ["fc_in"]}, TypeError, r"^plan must be a dict"),
        ({"optimizer": torch.optim.AdamW}, TypeError, r"torch.optim.adamw.AdamW is a torch optimizer class; "
                                                      r"pass a raytp optimizer spec, e.g. raytp.AdamW"),
        ({"optimizer": "adamw"}, TypeError, r"optimizer must be an optimizer spec with build\(params\)"),
    ]:
        with pytest.raises(error, match=match):
            BuildSpec(model=Net, **kwargs)


def test_patterns_that_match_nothing_are_refused_on_the_driver(cluster2):
    """activation_checkpointing and compile patterns are matched against the factory's
    module made on the meta device: a ValueError on the driver, not a RankError."""
    with pytest.raises(ValueError, match=r"activation_checkpointing pattern 'fc_inn' matches no submodule "
                                         r"of Net; close names: \['fc_in'"):
        cluster2.build(Net, plan=PLAN, activation_checkpointing={"fc_inn": "full"})
    with pytest.raises(ValueError, match=r"compile pattern 'blocks.\*' matches no submodule"):
        cluster2.build(Net, plan=PLAN, compile=("blocks.*",))
    assert cluster2.build(Net, plan=PLAN, activation_checkpointing={"fc_in": "full"})["trains"]


def test_a_raytp_configs_patterns_are_matched_on_the_driver():
    """A raytp config's module names come from a miniature of it built on the driver (the
    1.1B Llama's in milliseconds): a pattern that matches nothing is a ValueError before any
    rank work; torch's RNG is left as it was."""
    from raytp.models import BertConfig, GPTConfig

    llama = GPTConfig(vocab_size=32000, n_layers=22, n_heads=32, n_kv_heads=4, d_model=2048, d_ff=5632,
                      norm="rmsnorm", activation="swiglu", positions="rope", bias=False)
    state = torch.random.get_rng_state()
    with pytest.raises(ValueError, match=r"activation_checkpointing pattern 'layer\.\*' matches no "):
        BuildSpec(llama, activation_checkpointing={"layer.*": "full"}).check(2)
    with pytest.raises(ValueError, match=r"compile pattern 'layers\.22' matches no submodule"):
        BuildSpec(llama, compile=("layers.22",)).check(2)
    BuildSpec(llama, activation_checkpointing={"layers.*.mlp": "full"}, compile=("layers.21",)).check(2)
    with pytest.raises(ValueError, match=r"'encoder\.\*' matches no submodule"):
        BuildSpec(BertConfig(n_layers=2), activation_checkpointing={"encoder.*": "full"}).check(1)
    assert torch.equal(torch.random.get_rng_state(), state)


def test_torchrun_builds_the_rank_a_ray_actor_builds(cluster2):
    """examples/torchrun_gpt.py builds its rank with build_engine from a BuildSpec; at
    tp=2 under torchrun it trains exactly as tp=1 under torchrun and as the same spec
    through TPCluster(tp=2)."""
    torchrun = Path(sys.executable).with_name("torchrun")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    runs = {}
    for tp in (1, 2):
        out = subprocess.run([str(torchrun), "--standalone", "--nproc_per_node", str(tp),
                              str(ROOT / "examples" / "torchrun_gpt.py"), "--steps", "4"],
                             capture_output=True, text=True, timeout=240, env=env)
        assert out.returncode == 0, out.stderr[-3000:]
        runs[tp] = json.loads(out.stdout.strip().splitlines()[-1])["losses"]
    example = _example("torchrun_gpt")
    cluster2.build(example.SPEC)
    through_ray = [cluster2.train_step(b)["loss"] for b in example.batches(4)]
    assert len(runs[2]) == 4 and runs[2][-1] < runs[2][0]
    np.testing.assert_allclose(runs[2], runs[1], rtol=1e-10)
    np.testing.assert_allclose(through_ray, runs[2], rtol=1e-12)


# -- inference-only ranks ----------------------------------------------------------------

def _requires_grad(actor):
    return [p.requires_grad for p in actor.engine.model.parameters()]


def test_inference_only_build_runs_forward_but_not_training(cluster2):
    info = cluster2.build(Net, plan=PLAN, optimizer=None, seed=0)
    assert info["trains"] is False
    batch = make_batch()
    assert cluster2.run(_requires_grad) == [[False] * 4] * 2
    assert cluster2.forward(batch) == [{"phase": "forward"}] * 2
    evaluated = cluster2.evaluate(batch)
    torch.manual_seed(0)
    ref = Net()
    want = F.cross_entropy(ref(torch.from_numpy(batch["x"])), torch.from_numpy(batch["y"])).item()
    np.testing.assert_allclose(evaluated["loss"], want, rtol=1e-12)
    message = r"\(\) on a cluster built without an optimizer: build\(..., optimizer=None\) is inference-only"
    for phase, call in [("backward", cluster2.backward), ("step", cluster2.step),
                        ("train_step", lambda: cluster2.train_step(batch)),
                        ("fit", lambda: cluster2.fit([batch], progress=False))]:
        with pytest.raises(InferenceOnly, match=phase + message):
            call()
    assert cluster2.data_position == 1  # only the forward consumed a batch
    # the engine refuses too (a torchrun user, or a call that reaches it another way)
    with pytest.raises(RankError, match=r"InferenceOnly: backward\(\) on a rank built without an optimizer"):
        cluster2.run("backward")


def test_inference_only_rank_holds_less_memory(cluster2):
    """After a step, a training rank holds AdamW's two moments (and its gradients are
    freed); an inference rank holds the parameters alone."""
    cluster2.build(Net, plan=PLAN, optimizer=raytp.AdamW(), seed=0)
    cluster2.train_step(make_batch())
    training = cluster2.run("memory_bytes")
    cluster2.build(Net, plan=PLAN, optimizer=None, seed=0)
    cluster2.evaluate(make_batch())
    inference = cluster2.run("memory_bytes")
    for train, infer in zip(training, inference, strict=True):
        assert infer["param_bytes"] == train["param_bytes"] > 0
        assert infer["grad_bytes"] == infer["optimizer_bytes"] == 0
        assert train["optimizer_bytes"] >= 2 * train["param_bytes"]  # exp_avg, exp_avg_sq
        assert sum(infer.values()) < sum(train.values()) / 2, (infer, train)


# -- DTensor views through the driver ----------------------------------------------------

def test_gather_returns_each_full_parameter(cluster2):
    cluster2.build(Net, plan=PLAN, seed=0)
    torch.manual_seed(0)
    ref = dict(Net().named_parameters())
    for name, want in ref.items():
        torch.testing.assert_close(cluster2.gather(name), want.detach(), rtol=0, atol=0)
    cluster2.train_step(make_batch())
    shards = cluster2.run(lambda actor: actor.engine.model.fc_in.weight.detach().clone())
    torch.testing.assert_close(cluster2.gather("fc_in.weight"), torch.cat(shards, 0), rtol=0, atol=0)
    with pytest.raises(RankError, match=r"KeyError: .*has no parameter 'fc_in.wieght'; close names: "
                                        r"\['fc_in.weight'"):
        cluster2.gather("fc_in.wieght")


# -- mistakes refused on the driver, before any rank work --------------------------------

class Clf(torch.nn.Module):
    """A colwise layer, a replicated norm, a head: plans that leave a sharded output."""

    def __init__(self):
        super().__init__()
        self.fc_in = torch.nn.Linear(12, 32, dtype=torch.float64)
        self.norm = torch.nn.LayerNorm(32, dtype=torch.float64)
        self.fc_out = torch.nn.Linear(32, 5, dtype=torch.float64)

    def forward(self, x):
        return self.fc_out(self.norm(torch.tanh(self.fc_in(x))))


def test_common_mistakes_are_refused_on_the_driver_with_what_to_pass(cluster2, caplog):
    """Each a TypeError or ValueError on the driver (not a RankError from a rank), saying
    what to pass instead; the cluster stays usable after each."""
    sharded = r"plan: 'fc_in' is colwise, so its output is sharded \(..., features / tp\)"
    for kwargs, error, match in [
        ({"model": Net()}, TypeError, r"^model is an nn.Module instance \(Net\); pass its class or a "
                                      r"zero-argument factory instead, e.g. build\(Net\) or build\(lambda"),
        ({"optimizer": torch.optim.AdamW}, TypeError,
         r"torch optimizer class; pass a raytp optimizer spec, e.g. raytp.AdamW\(lr=3e-4\) or raytp.SGD"),
        ({"model": Clf, "plan": {"fc_in": "colwise", "fc_out": "rowwise"}}, ValueError,
         sharded + r", but the next layer with parameters, 'norm' \(LayerNorm\), is not in the plan .* "
                   r"a colwise output must reach a rowwise layer \(or be gathered\) before any replicated"),
        ({"model": Clf, "plan": {"fc_out": "colwise"}}, ValueError,
         r"plan: 'fc_out' is colwise and no rowwise layer follows it, so the model's output would be "
         r"sharded.* Make 'fc_out' 'colwise_gather', or add a 'rowwise' layer after it"),
        ({"plan": {"fc_in": "columnwise", "fc_out": "rowwise"}}, ValueError,
         r"^plan\['fc_in'\] = 'columnwise' is not one of \['colwise', 'colwise_gather', 'rowwise', 'vocab'"),
        ({"plan": {"fc_inn": "colwise", "fc_out": "rowwise"}}, ValueError,
         r"^plan pattern 'fc_inn' matches no submodule of Net; its submodules are \['fc_in', 'fc_out'\]"),
    ]:
        with pytest.raises(error, match=match):
            cluster2.build(**{"model": Net, "plan": PLAN, **kwargs})
    assert cluster2.build(Clf, plan={"fc_in": "colwise_gather"})["trains"]  # gathered: it builds
    with caplog.at_level("WARNING", logger="raytp.engine.spec"):
        cluster2.build(Net, plan=None)
    assert "plan=None: Net is replicated whole on every rank (no tensor parallelism)" in caplog.text
    plain = (r"^export_hf\(\) writes raytp's GPT-2 and Llama models as Hugging Face checkpoints .* this "
             r"cluster's model comes from Net, a plain module: save it with cluster.save\(path\)")
    with pytest.raises(TypeError, match=plain):
        cluster2.export_hf("/nonexistent/never-written")
    cluster2.build(raytp.models.BertConfig(vocab_size=64, n_layers=1, n_heads=2, d_model=16), optimizer=None)
    with pytest.raises(ValueError, match=r"^raytp exports GPT-2 or Llama checkpoints; the model's config "
                                         r"is a BertConfig"):
        cluster2.export_hf("/nonexistent/never-written")
    assert cluster2.build(Net, plan=PLAN)["trains"]  # still usable
