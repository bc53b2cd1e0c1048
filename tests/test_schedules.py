"""Learning-rate schedules and parameter groups: each schedule's factor against its
formula, picklable, bad values refused; a tp=2 engine with a schedule equals one-device
torch AdamW under LambdaLR with the same groups (float64); norms, biases and embeddings
get no weight decay by default; a checkpoint keeps the schedule's position; the driver
reports the lr and refuses a bad schedule."""

import json
import math
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import raytp
from raytp.engine import BuildSpec, build_engine
from raytp.models import GPTConfig
from raytp.schedules import WSD, Constant, WarmupCosine, WarmupLinear

import _dist
from helpers import assert_params_match, mesh, world

SCHEDULES = [Constant(), Constant(3), WarmupCosine(4, 12, 0.2), WarmupLinear(2, 6),
             WSD(2, 10, 4, 0.1, "sqrt"), WSD(0, 8, 3, 0.0, "cosine"), WSD(1, 5, 2)]


def _cos(progress):
    return (1 + math.cos(math.pi * progress)) / 2


# -- the formulas -------------------------------------------------------------------------

def test_warmup_cosine_follows_its_formula():
    s = WarmupCosine(warmup_steps=4, total_steps=12, min_lr_ratio=0.2)  # 8 decay steps
    expected = {0: 1 / 5, 3: 4 / 5, 4: 0.2 + 0.8 * _cos(1 / 9), 7: 0.2 + 0.8 * _cos(4 / 9),
                11: 0.2 + 0.8 * _cos(8 / 9), 12: 0.2, 13: 0.2, 10_000: 0.2}
    assert {k: s.factor(k) for k in expected} == pytest.approx(expected, rel=1e-15)
    values = [s(k) for k in range(14)]
    assert values == [s.factor(k) for k in range(14)]  # callable, as a LambdaLR lambda
    assert values[:4] == sorted(values[:4]) and values[4:] == sorted(values[4:], reverse=True)
    assert max(values) < 1.0  # the peak is never quite reached: step 4 already decays


def test_warmup_linear_follows_its_formula():
    s = WarmupLinear(2, 6)  # min_lr_ratio 0; 4 decay steps
    expected = {0: 1 / 3, 1: 2 / 3, 2: 1 - 1 / 5, 3: 1 - 2 / 5, 5: 1 - 4 / 5, 6: 0.0, 50: 0.0}
    assert {k: s.factor(k) for k in expected} == pytest.approx(expected, rel=1e-15, abs=1e-15)


@pytest.mark.parametrize("decay_type, shape", [("linear", lambda p: 1 - p), ("cosine", _cos),
                                               ("sqrt", lambda p: 1 - math.sqrt(p))])
def test_wsd_warms_up_stays_then_decays(decay_type, shape):
    s = WSD(warmup_steps=2, total_steps=10, decay_steps=4, min_lr_ratio=0.1, decay_type=decay_type)
    expected = {0: 1 / 3, 1: 2 / 3, 2: 1.0, 5: 1.0, 6: 0.1 + 0.9 * shape(1 / 5), 9: 0.1 + 0.9 * shape(4 / 5),
                10: 0.1, 11: 0.1}
    assert {k: s.factor(k) for k in expected} == pytest.approx(expected, rel=1e-15)


def test_constant_is_one_after_its_warmup():
    assert [Constant().factor(k) for k in (0, 1, 10**6)] == [1.0, 1.0, 1.0]
    assert [Constant(3).factor(k) for k in range(5)] == pytest.approx([1 / 4, 2 / 4, 3 / 4, 1, 1], rel=1e-15)


@pytest.mark.parametrize("schedule", SCHEDULES, ids=repr)
def test_schedules_pickle(schedule):
    again = pickle.loads(pickle.dumps(schedule))
    assert again == schedule
    assert [again.factor(k) for k in range(15)] == [schedule.factor(k) for k in range(15)]


@pytest.mark.parametrize("make, message", [
    (lambda: WarmupCosine(10, 5, 0.1), r"warmup_steps=10 must be less than total_steps=5"),
    (lambda: WarmupLinear(5, 5), r"warmup_steps=5 must be less than total_steps=5"),
    (lambda: WarmupCosine(-1, 5), r"warmup_steps=-1 must be an integer >= 0"),
    (lambda: WarmupCosine(0, 0), r"total_steps=0 must be an integer >= 1"),
    (lambda: WarmupCosine(1.5, 5), r"warmup_steps=1.5 must be an integer"),
    (lambda: WarmupCosine(1, 5, 1.5), r"min_lr_ratio=1.5 must be in \[0, 1\]"),
    (lambda: WarmupLinear(1, 5, -0.1), r"min_lr_ratio=-0.1 must be in \[0, 1\]"),
    (lambda: WarmupLinear(1, 5, float("nan")), r"min_lr_ratio=nan must be in \[0, 1\]"),
    (lambda: WSD(2, 10, 0), r"decay_steps=0 must be an integer >= 1"),
    (lambda: WSD(4, 10, 7), r"warmup_steps=4 \+ decay_steps=7 must be at most total_steps=10"),
    (lambda: WSD(1, 10, 3, decay_type="exp"), r"decay_type='exp' must be one of"),
    (lambda: WSD(10, 10, 1), r"warmup_steps=10 must be less than total_steps=10"),
    (lambda: Constant(-2), r"warmup_steps=-2 must be an integer >= 0"),
    (lambda: WarmupCosine(1, 5).factor(-1), r"step=-1 must be an integer >= 0"),
    (lambda: raytp.AdamW(no_decay="bias"), r"no_decay='bias' must be one of \('default', 'none'\)"),
    (lambda: raytp.SGD(no_decay=["*.bias"]), r"no_decay=\['\*.bias'\] must be one of"),
    (lambda: BuildSpec(model=nn.Module, optimizer=None, lr_schedule=Constant()), r"needs an optimizer"),
])
def test_bad_values_are_refused_naming_them(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_a_schedule_must_have_a_factor():
    with pytest.raises(TypeError, match=r"lr_schedule must be a schedule with factor\(step\).*got str"):
        BuildSpec(model=nn.Module, lr_schedule="cosine")


# -- parameter groups ---------------------------------------------------------------------

class Tagger(nn.Module):
    """Token ids (B, T) -> class logits (B, 5): an embedding, a norm, biased linears."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(11, 8, dtype=torch.float64)
        self.norm = nn.LayerNorm(8, dtype=torch.float64)
        self.fc_in = nn.Linear(8, 16, dtype=torch.float64)
        self.fc_out = nn.Linear(16, 5, dtype=torch.float64)

    def forward(self, x):
        return self.fc_out(torch.tanh(self.fc_in(self.norm(self.embed(x))))).mean(1)


PLAN = {"embed": "vocab", "fc_in": "colwise", "fc_out": "rowwise"}
TAGGER_NO_DECAY = {"embed.weight", "norm.weight", "norm.bias", "fc_in.bias", "fc_out.bias"}


def _group_names(model, groups):
    names = {id(p): n for n, p in model.named_parameters()}
    return [{names[id(p)] for p in g["params"]} for g in groups], [g["weight_decay"] for g in groups]


def test_a_plain_modules_norms_biases_and_embeddings_get_no_decay():
    model = Tagger()
    names, decays = _group_names(model, raytp.optim.param_groups(model, 0.1))
    assert names == [{"fc_in.weight", "fc_out.weight"}, TAGGER_NO_DECAY] and decays == [0.1, 0.0]
    optimizer = raytp.AdamW(weight_decay=0.1).build(model)
    assert _group_names(model, optimizer.param_groups) == (names, decays)
    # named parameters alone: biases and 1-D parameters (the embedding is not known as one)
    names, _ = _group_names(model, raytp.optim.param_groups(model.named_parameters(), 0.1))
    assert names[1] == TAGGER_NO_DECAY - {"embed.weight"}
    optimizer = raytp.SGD(weight_decay=0.1, no_decay="none").build(model)
    names, decays = _group_names(model, optimizer.param_groups)
    assert names == [{n for n, _ in model.named_parameters()}] and decays == [0.1]
    names, _ = _group_names(model, raytp.optim.param_groups(model, 0.1, ("*.bias",)))
    assert names[1] == {"norm.bias", "fc_in.bias", "fc_out.bias"}
    assert len(raytp.AdamW().build(model.parameters()).param_groups) == 1  # no names: one group
    with pytest.raises(ValueError, match="without names"):
        raytp.AdamW(no_decay=("*.bias",)).build(model.parameters())


def _gpt_groups(config):
    model = config.build(mesh(world()[1]))
    names, decays = _group_names(model, raytp.optim.param_groups(model, 0.1))
    return names, decays, [n for n, _ in model.named_parameters()]


SMALL = {"vocab_size": 37, "n_layers": 2, "d_model": 32, "d_ff": 48, "max_seq_len": 16, "dtype": "float64"}
LLAMA = {"norm": "rmsnorm", "activation": "swiglu", "positions": "rope", "bias": False,
         "tie_embeddings": False, "n_heads": 8, "n_kv_heads": 2}
GPTS = {"gpt2": GPTConfig(**SMALL, n_heads=4), "llama": GPTConfig(**SMALL, **LLAMA)}


@pytest.mark.parametrize("name", GPTS)
def test_gpt_norms_biases_and_embeddings_get_no_decay(name):
    for names, decays, all_names in _dist.run(2, _gpt_groups, GPTS[name]):
        assert decays == [0.1, 0.0]
        off = {n for n in all_names if n.endswith(".bias") or "norm." in n or n.split(".")[0] in
               ("embed", "pos_embed")}
        assert names == [set(all_names) - off, off]
        assert ("lm_head.weight" in names[0]) == (name == "llama")  # untied head: a linear, decayed
        assert "layers.1.attn.qkv.weight" in names[0] and "embed.weight" in names[1]


# -- a tp=2 engine against one-device torch -----------------------------------------------

def _tagger_batch(step):
    g = torch.Generator().manual_seed(step)
    return {"x": torch.randint(0, 11, (4, 6), generator=g), "y": torch.randint(0, 5, (4,), generator=g)}


def _reference(schedule, steps, lr, weight_decay):
    """One device: torch AdamW over the groups named by hand, under LambdaLR."""
    torch.manual_seed(0)
    model = Tagger()
    off = [p for n, p in model.named_parameters() if n in TAGGER_NO_DECAY]
    on = [p for n, p in model.named_parameters() if n not in TAGGER_NO_DECAY]
    optimizer = torch.optim.AdamW([{"params": on}, {"params": off, "weight_decay": 0.0}], lr=lr,
                                  weight_decay=weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule.factor)
    lrs = []
    for step in range(steps):
        batch = _tagger_batch(step)
        F.cross_entropy(model(batch["x"]), batch["y"]).backward()
        lrs.append([g["lr"] for g in optimizer.param_groups])
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
    return model, lrs


def _engine_against_torch(schedule):
    rank, n = world()
    spec = BuildSpec(model=Tagger, plan=PLAN, optimizer=raytp.AdamW(lr=0.05, weight_decay=0.3),
                     lr_schedule=schedule)
    engine = build_engine(mesh(n), spec)
    metrics = [engine.train_step(_tagger_batch(step)) for step in range(4)]
    ref, ref_lrs = _reference(schedule, 4, lr=0.05, weight_decay=0.3)
    assert [m["lr"] for m in metrics] == [lrs[0] for lrs in ref_lrs]
    assert [[g["lr"] for g in engine.optimizer.param_groups]] == [ref_lrs[-1]]
    assert_params_match(engine.model, ref, engine.mesh.tp_rank, rtol=1e-10, atol=1e-12)
    return [m["lr"] for m in metrics]


@pytest.mark.parametrize("schedule", [WarmupCosine(2, 4, 0.1), WSD(1, 4, 2, 0.0, "sqrt")], ids=repr)
def test_tp2_engine_with_a_schedule_equals_torch_lambda_lr(schedule):
    for lrs in _dist.run(2, _engine_against_torch, schedule):
        np.testing.assert_allclose(lrs, [0.05 * schedule.factor(k) for k in range(4)], rtol=1e-15)
        assert len(set(lrs)) == 4  # the schedule moved the lr at every step


def _metrics_lr_without_schedule():
    engine = build_engine(mesh(world()[1]), BuildSpec(model=Tagger, plan=PLAN, optimizer=raytp.SGD(lr=0.25)))
    return [engine.train_step(_tagger_batch(k))["lr"] for k in range(2)]


def test_without_a_schedule_the_metrics_report_the_optimizers_lr():
    assert _dist.run(2, _metrics_lr_without_schedule) == [[0.25, 0.25]] * 2


# -- checkpoints keep the schedule's position ---------------------------------------------

CKPT_SCHEDULE = WarmupLinear(2, 6, 0.1)


def _gpt_batch(step):
    return {"input_ids": torch.randint(0, 37, (4, 8), generator=torch.Generator().manual_seed(step))}


def _gpt_engine(seed):
    spec = BuildSpec(model=GPTS["gpt2"], optimizer=raytp.AdamW(lr=1e-2, weight_decay=0.1), seed=seed,
                     lr_schedule=CKPT_SCHEDULE, max_grad_norm=1.0)
    return build_engine(mesh(world()[1]), spec)


def _steps(engine, steps):
    return [(m["loss"], m["lr"]) for m in (engine.train_step(_gpt_batch(k)) for k in steps)]


def _train_six_saving_at_three(path):
    engine = _gpt_engine(seed=0)
    _steps(engine, range(3))
    raytp.checkpoint.save(path, engine.model, engine.optimizer, engine.mesh, step=engine.step_count)
    return _steps(engine, range(3, 6))


def _load_and_go_on(path):
    engine = _gpt_engine(seed=1)  # other weights: the checkpoint replaces them
    assert engine.load_checkpoint(path)["step"] == 3
    return _steps(engine, range(3, 6))


@pytest.mark.parametrize("n", [2, 1])
def test_a_loaded_checkpoint_goes_on_at_the_schedules_lr(tmp_path, n):
    path = str(tmp_path / "ckpt")
    expected = _dist.run(2, _train_six_saving_at_three, path)[0]
    assert [lr for _, lr in expected] == pytest.approx([1e-2 * CKPT_SCHEDULE.factor(k) for k in (3, 4, 5)],
                                                       rel=1e-15)
    for after in _dist.run(n, _load_and_go_on, path):
        np.testing.assert_allclose(after, expected, rtol=1e-9, atol=0)


# -- the driver -----------------------------------------------------------------------------

def _numpy_batch(step):
    return {key: value.numpy() for key, value in _tagger_batch(step).items()}


@pytest.mark.slow
def test_the_driver_reports_the_schedules_lr_and_refuses_a_bad_one(ray_local):
    from raytp.driver.progress import _postfix

    schedule = WarmupCosine(2, 3, 0.1)
    with raytp.TPCluster(tp=2, device="cpu") as cluster:
        cluster.build(Tagger, plan=PLAN, optimizer=raytp.AdamW(lr=0.05, weight_decay=0.3), seed=0,
                      lr_schedule=schedule)
        summaries = [cluster.train_step(_numpy_batch(step)) for step in range(3)]
        assert [s["lr"] for s in summaries] == pytest.approx([0.05 * schedule.factor(k) for k in range(3)],
                                                             rel=1e-15)
        ref, _ = _reference(schedule, 3, lr=0.05, weight_decay=0.3)
        for name, p in ref.named_parameters():  # [:11]: the vocabulary is padded to 12 rows for tp=2
            torch.testing.assert_close(cluster.gather(name)[:11], p.detach()[:11], rtol=1e-10, atol=1e-12)
        assert _postfix(summaries[-1])["lr"] == f"{0.05 * schedule.factor(2):.3g}"
        with pytest.raises(ValueError, match=r"warmup_steps=10 must be less than total_steps=5"):
            cluster.build(Tagger, plan=PLAN, lr_schedule=WarmupCosine(10, 5, 0.1))
        with pytest.raises(TypeError, match=r"lr_schedule must be a schedule"):
            cluster.build(Tagger, plan=PLAN, lr_schedule=lambda step: 1.0)
        assert cluster.train_step(_numpy_batch(3))["lr"] == pytest.approx(0.05 * 0.1)  # the same build


def _save_one_group_load_two(path):
    m = mesh(world()[1])
    torch.manual_seed(0)
    model = GPTS["gpt2"].build(m)
    one = raytp.AdamW(lr=1e-2, no_decay="none").build(model)
    raytp.checkpoint.save(path, model, one, m)
    groups = json.loads((Path(path) / "checkpoint.json").read_text())["optimizer"]["param_groups"]
    with pytest.raises(raytp.checkpoint.CheckpointError, match=r"has 1 param groups; this one has 2 .*"
                       r"no_decay='none'"):
        raytp.checkpoint.load(path, model, raytp.AdamW(lr=1e-2).build(model), m)
    return len(groups)


def test_a_one_group_checkpoint_into_two_groups_is_refused_naming_no_decay(tmp_path):
    assert _dist.run(2, _save_one_group_load_two, str(tmp_path / "ckpt")) == [1, 1]
