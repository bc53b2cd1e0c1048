"""`raytp bench`: the contenders compute the same function, the no-collective baseline
issues nothing, the targets are judged right, and the whole bench runs end to end on
CPU ranks (through TPCluster, and under torchrun)."""

import json
import re
import sys

import numpy as np
import pytest
import torch

from raytp.bench.workloads import quick_workloads

import _dist
from helpers import mesh

QUICK = {w.name: w for w in quick_workloads()}
SAME = {"rtol": 1e-5, "atol": 1e-5}  # float32; only the order of the sums differs


def _outputs(name, tp):
    from raytp.bench.runner import forward_outputs

    return forward_outputs(mesh(tp), QUICK[name])


@pytest.mark.parametrize("tp", [2, 4])
@pytest.mark.parametrize("name", ["mlp-32", "block-16", "block-16-sp", "gpt"])
def test_contenders_compute_the_same_function(name, tp):
    for rank, outputs in enumerate(_dist.run(tp, _outputs, name, tp)):
        expected = {"one-gpu", "torch-tp", "raytp", "raytp-overlap"}
        assert expected <= outputs.keys(), f"rank {rank}: only {sorted(outputs)} ran"
        ref_out, ref_loss = outputs["one-gpu"]
        for contender, (out, loss) in outputs.items():
            torch.testing.assert_close(out, ref_out, **SAME, msg=lambda m, c=contender: f"{c} output: {m}")
            assert loss == pytest.approx(ref_loss, rel=1e-5, abs=1e-6), contender


def _null_mlp_on_rank0_only():
    from raytp.bench.nullcomm import null_mesh
    from raytp.comm import count_collectives
    from raytp.nn import ParallelMLP

    m = mesh(2)
    if m.tp_rank != 0:  # rank 1 never joins: a real collective on rank 0 would hang
        return None
    mlp = ParallelMLP(16, 64, mesh=null_mesh(m), bias=False)
    x = torch.randn(1, 8, 16, requires_grad=True)
    with count_collectives() as counter:
        mlp(x).sum().backward()
    return counter.by_kind(), counter.total_bytes


def test_null_communicator_records_but_issues_nothing():
    kinds, nbytes = _dist.run(2, _null_mlp_on_rank0_only)[0]
    assert kinds == {"all_reduce": 2}  # the forward's and the input gradient's
    assert nbytes == 2 * 8 * 16 * 4


def _row(workload, contender, ms, **kw):
    return {"workload": workload, "label": workload, "flops": 1e12, "contender": contender, "status": "ok",
            "ms": ms, "baseline": False,
            "ratio_vs_torch_tp": None, "speedup_vs_one_gpu": None, **kw}


def test_targets_are_judged_on_the_right_rows():
    from raytp.bench.results import evaluate_targets

    results = {
        "rows": [
            _row("mlp-8192", "raytp-overlap", 20.0, ratio_vs_torch_tp=0.9, speedup_vs_one_gpu=1.85),
            _row("mlp-2048", "raytp", 1.0, ratio_vs_torch_tp=0.6),
            _row("mlp-2048", "raytp-overlap", 0.9, ratio_vs_torch_tp=0.45),
        ],
        "control_plane": {"rows": [
            {"model": "small", "in_actor_ms": 5.0, "blocking_ratio": 1.5, "pipelined_ratio": 1.4},
            {"model": "big", "in_actor_ms": 80.0, "blocking_ratio": 1.01, "pipelined_ratio": 1.0},
        ]},
        "torchrun": {"comparison": [
            {"workload": "gpt", "contender": "raytp", "torchrun_ms": 60.0, "ray_ms": 61.0, "ratio": 61 / 60},
            {"workload": "gpt", "contender": "torch-tp", "torchrun_ms": 60.0, "ray_ms": 90.0, "ratio": 1.5},
            {"workload": "mlp-32", "contender": "raytp", "torchrun_ms": 1.0, "ray_ms": 2.0, "ratio": 2.0},
        ]},
    }
    met = [t["met"] for t in evaluate_targets(results)]
    assert met == [True, False, True, True, True]
    assert evaluate_targets({"rows": []})[0]["met"] is None


def test_control_plane_command_prints_driver_against_in_actor_steps(ray_local, tmp_path, capsys):
    from raytp.cli import main

    path = tmp_path / "control.json"
    assert main(["bench", "control-plane", "--device", "cpu", "--sizes", "32", "64", "--tokens", "16",
                 "--steps", "4", "--json", str(path)]) == 0
    rows = json.loads(path.read_text())
    assert [r["hidden"] for r in rows] == [32, 64]
    for r in rows:
        assert min(r["in_actor_ms"], r["driver_pipelined_ms"], r["driver_blocking_ms"]) > 0
        assert r["pipelined_ratio"] == pytest.approx(r["driver_pipelined_ms"] / r["in_actor_ms"])
        assert r["blocking_ratio"] == pytest.approx(r["driver_blocking_ms"] / r["in_actor_ms"])
    table = capsys.readouterr().out
    assert "control plane: tp=2" in table and "in-actor ms" in table
    assert re.search(r"^\s+32\s+[0-9.]+\s+[0-9.]+\s+[0-9.]+\s+[0-9.]+\s+[0-9.]+$", table, re.M), table


def test_quick_bench_through_tpcluster(ray_local, tmp_path, capsys):
    from raytp.bench.contenders import CONTENDERS, NO_COMM
    from raytp.cli import main

    path = tmp_path / "bench.json"
    assert main(["bench", "--quick", "--device", "cpu", "--no-torchrun", "--json", str(path)]) == 0
    results = json.loads(path.read_text())
    rows = {(r["workload"], r["contender"]): r for r in results["rows"]}
    names = [*CONTENDERS, *NO_COMM.values()]
    assert set(rows) == {(w, c) for w in QUICK for c in names}
    for (workload, contender), row in rows.items():
        if contender == "raytp-cupy":
            assert row["status"] == "skipped" and "CUDA" in row["reason"]
        elif contender == "raytp-symm-mem":  # SP workloads only, and on CUDA
            reason = "need CUDA tensors" if workload.endswith("-sp") else "serve sequence parallelism"
            assert row["status"] == "skipped" and reason in row["reason"], (workload, row["reason"])
        elif contender in ("one-gpu", "torch-tp", "raytp", "raytp-no-comm"):
            assert row["status"] == "ok" and row["ms"] > 0 and row["steps"] == 3, (workload, contender, row)
    raytp_row = rows[("mlp-32", "raytp")]
    assert raytp_row["collectives"] == {"all_reduce": 2}
    assert raytp_row["exposed_comm_ms"] == pytest.approx(raytp_row["ms"] - raytp_row["compute_only_ms"])

    full = rows[("gpt", "one-gpu")]["memory_per_rank"][0]["state_bytes"]
    for contender in ("torch-tp", "raytp"):
        for m in rows[("gpt", contender)]["memory_per_rank"]:
            rep = m["replicated_state_bytes"]
            assert 0 < rep < m["state_bytes"] < full
            assert m["state_bytes"] == pytest.approx((full - rep) / 2 + rep, rel=0.02), contender

    assert results["control_plane"]["status"] == "ok"
    assert results["control_plane"]["rows"][0]["in_actor_ms"] > 0
    assert len(results["targets"]) == 5
    out = capsys.readouterr().out
    assert "## Workloads x contenders" in out and "| gpt | raytp |" in out


def test_the_same_bench_runs_under_torchrun():
    from raytp.bench.runner import BenchOptions
    from raytp.driver.bench import run_torchrun

    options = BenchOptions(workloads=("mlp",), contenders=("one-gpu", "torch-tp", "raytp"), quick=True,
                           warmup=1, iters=2, rounds=1, exposed_comm=False)
    result = run_torchrun(options, tp=2, device="cpu", ray_rows=[], timeout_s=240)
    assert result["status"] == "ok", result.get("log_tail")
    rows = result["rows"]
    assert {(r["workload"], r["contender"]) for r in rows} == {
        (w, c) for w in ("mlp-32", "mlp-64") for c in options.contenders}
    assert all(r["status"] == "ok" and r["ms"] > 0 for r in rows)
    assert result["meta"]["tp"] == 2


def test_report_renders_the_results_json(tmp_path, capsys):
    from raytp.bench import report

    results = {"meta": {"device_name": "GPU", "tp": 2, "torch": "x", "dtype": "torch.bfloat16",
                        "options": {"iters": 20, "warmup": 5, "rounds": 4}},
               "rows": [_row("mlp-8192", "torch-tp", 20.0, ms_min=19.0, ms_max=21.0, tflops=100.0, mfu=0.1,
                             exposed_comm_ms=None, compute_only_ms=None, collectives=None)]}
    path = tmp_path / "r.json"
    path.write_text(json.dumps(results))
    assert report.main([str(path)]) == 0
    out = capsys.readouterr().out
    assert "| mlp-8192 | torch-tp | 20.000 |" in out and "not measured" in out


# -- on the GPU host: every contender runs, and they agree ----------------------------------


def _gpu_bench():
    from raytp.bench.runner import BenchOptions, run_rank

    return run_rank(mesh(2), BenchOptions(quick=True, warmup=1, iters=2, rounds=2))


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_quick_bench_on_two_gpus():
    pytest.importorskip("cupy")
    from raytp.bench.results import combine

    results = combine(_dist.run(2, _gpu_bench, backend="nccl"))
    bad = [(r["workload"], r["contender"], r["reason"]) for r in results["rows"] if r["status"] != "ok"
           and not (r["contender"] == "raytp-symm-mem" and not r["workload"].endswith("-sp"))]
    assert not bad, bad


def _gpu_outputs(name):
    from raytp.bench.runner import forward_outputs

    return forward_outputs(mesh(2), QUICK[name])


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
@pytest.mark.parametrize("name", ["mlp-32", "block-16", "block-16-sp", "gpt"])
def test_contenders_agree_on_two_gpus(name):
    outputs = _dist.run(2, _gpu_outputs, name, backend="nccl")[0]
    expected = {"one-gpu", "torch-tp", "raytp", "raytp-overlap", "raytp-cupy"}
    assert expected | ({"raytp-symm-mem"} if name.endswith("-sp") else set()) <= outputs.keys()
    ref_out, ref_loss = outputs["one-gpu"]
    for contender, (out, loss) in outputs.items():
        torch.testing.assert_close(out, ref_out, rtol=1e-4, atol=1e-4, msg=lambda m, c=contender: f"{c}: {m}")
        assert loss == pytest.approx(ref_loss, rel=1e-4), contender


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))


def test_recipe_bench_runs_every_setting_on_cpu(ray_local, tmp_path):
    """raytp bench recipe --quick: each recipe setting trains the same tiny Llama on CPU
    ranks, and the report has a row per setting. The compiled settings use aot_eager here:
    inductor's C++ build takes a minute on two cores (tests/test_compile.py runs inductor)."""
    from raytp.cli import main

    path = tmp_path / "recipe.json"
    assert main(["bench", "recipe", "--quick", "--device", "cpu", "--steps", "2", "--warmup", "1",
                 "--compile-backend", "aot_eager", "--json", str(path)]) == 0
    report = json.loads(path.read_text())
    assert report["compile_backend"] == "aot_eager"
    assert {"bf16", "mixed", "mixed+selective", "mixed+full"} <= set(report["settings"])
    for row in report["settings"].values():
        assert row["ms_per_step"] > 0 and np.isfinite(row["loss"])
    # checkpointing recomputes, it does not change the step: the same losses as mixed alone
    mixed = report["settings"]["mixed"]["loss"]
    assert report["settings"]["mixed+full"]["loss"] == report["settings"]["mixed+selective"]["loss"] == mixed
    # full checkpointing around the compiled blocks: the compiled run's losses (bf16 compute)
    compiled = report["settings"]["mixed+compile"]["loss"]
    assert report["settings"]["mixed+full+compile"]["loss"] == pytest.approx(compiled, rel=1e-2)


def test_recipe_bench_runs_the_settings_asked_for(ray_local, tmp_path, capsys):
    from raytp.cli import main

    path = tmp_path / "recipe.json"
    assert main(["bench", "recipe", "--quick", "--device", "cpu", "--steps", "1", "--warmup", "1",
                 "--settings", "mixed,mixed+full", "--json", str(path)]) == 0
    assert list(json.loads(path.read_text())["settings"]) == ["mixed", "mixed+full"]
    assert "| setting | ms/step | vs mixed |" in capsys.readouterr().out
    with pytest.raises(ValueError, match=r"settings \['fp8'\] are not among \['bf16', 'mixed'"):
        main(["bench", "recipe", "--quick", "--settings", "bf16,fp8"])


# -- raytp bench decode -----------------------------------------------------------------------


def test_decode_bench_quick_transformers_contenders(tmp_path, capsys):
    """--quick --only transformers on CPU: both transformers contenders run every scenario
    they take part in, give the same greedy tokens (float32), and the report adds up."""
    from raytp.bench.decode import QUICK
    from raytp.cli import main

    path = tmp_path / "decode.json"
    assert main(["bench", "decode", "--quick", "--device", "cpu", "--only", "transformers",
                 "--json", str(path)]) == 0
    report = json.loads(path.read_text())
    rows = {(r["scenario"], r["contender"]): r for r in report["rows"]}
    scenarios = ("batch-1", "batch-4", "ragged-10")
    assert set(rows) == {(s, c) for s in scenarios for c in ("hf-dynamic", "hf-static")}
    assert rows[("ragged-10", "hf-dynamic")]["status"] == "skipped"
    for (scenario, contender), r in rows.items():
        if r["status"] == "skipped":
            continue
        assert r["status"] == "ok", (scenario, contender, r["reason"])
        n = 10 if scenario == "ragged-10" else int(scenario.split("-")[1])
        assert r["same_sequences"] in (None, [n, n]), (scenario, contender)
        (measured,) = r["rounds"]  # quick: one round
        steps = (QUICK.new_tokens - 1) * -(-n // QUICK.slots)  # after the first token, per batch of 4
        assert measured["decode_steps"] == steps and r["wall_s"] > 0 and r["ttft_s"] > 0
        # (total - ttft) / (new tokens - 1), per batch (on a busy CPU it can come out negative)
        decode_s = r["wall_s"] - measured["first_token_calls_s"]
        assert r["ms_per_step"] == pytest.approx(decode_s / steps * 1e3)
        assert r["tokens_per_s"] == pytest.approx(n * QUICK.new_tokens / r["wall_s"])
    assert rows[("batch-4", "hf-static")]["vs_hf_static"] == 1.0
    meta = report["meta"]
    assert meta["weight_bytes"] == QUICK.weight_bytes() and meta["floor_ms"] > 0
    assert [t["met"] for t in report["targets"]] == [None, None, None]  # quick: not judged
    out = capsys.readouterr().out
    assert "| batch-4 | hf-static |" in out and "Targets (one H200, tp=1):" in out


class _FakeGenerationCluster:
    """Issue 15's generation API as the decode bench calls it: ``generate`` and
    ``generation_stats`` of the last call."""

    def __init__(self):
        self.calls = []

    def generate(self, prompts, sampling, *, cuda_graphs=None):
        n, new = len(prompts), sampling.max_new_tokens
        self.calls.append((n, new, cuda_graphs))
        self.stats = {"decode_steps": new - 1, "decode_s": 0.002 * (new - 1), "prefill_s": 0.01,
                      "mean_active_slots": float(n), "first_token_s": [0.01 * (i + 1) for i in range(n)],
                      "tokens": n * new, "wall_s": 0.05, "cuda_graphs": bool(cuda_graphs)}
        return [[len(p) % 7] * new for p in prompts]

    def generation_stats(self):
        return self.stats


def test_decode_raytp_contenders_read_the_generation_stats(monkeypatch):
    import dataclasses

    import raytp
    from raytp.bench.decode import QUICK, scenarios
    from raytp.driver.decode import RaytpContender, run_scenario

    @dataclasses.dataclass(frozen=True)
    class Sampling:
        max_new_tokens: int

    monkeypatch.setattr(raytp, "SamplingParams", Sampling, raising=False)
    cluster = _FakeGenerationCluster()
    ragged = scenarios(QUICK)[-1]
    sides = {"raytp-eager": RaytpContender(cluster, False), "raytp-graphs": RaytpContender(cluster, True)}
    rows = run_scenario(ragged, sides, rounds=2)
    # warm-ups (eager: one batch of the slots' size, 2 tokens; graphs: a whole pass), then two
    # interleaved rounds of every prompt
    assert cluster.calls == [(4, 2, False), (10, 8, True)] + [(10, 8, False), (10, 8, True)] * 2
    for r in rows:
        assert r["status"] == "ok" and len(r["rounds"]) == 2
        assert r["ms_per_step"] == pytest.approx(2.0)
        assert r["ttft_s"] == pytest.approx(0.055)  # the mean of 0.01 .. 0.10
        assert r["tokens_per_s"] == pytest.approx(80 / r["wall_s"])
    assert rows[0]["same_sequences"] is None and rows[1]["same_sequences"] == [10, 10]
    assert rows[1]["rounds"][-1]["cuda_graphs"] is True


def test_decode_targets_are_judged_on_the_best_raytp_row():
    from raytp.bench.decode_report import add_comparisons, evaluate_targets

    def ok(scenario, contender, ms, tokens_per_s):
        return {"scenario": scenario, "contender": contender, "status": "ok", "ms_per_step": ms,
                "tokens_per_s": tokens_per_s}

    rows = [ok("batch-1", "hf-static", 3.5, 280), ok("batch-1", "raytp-eager", 9.0, 110),
            ok("batch-1", "raytp-graphs", 1.1, 900), ok("batch-32", "raytp-graphs", 2.4, 13000),
            ok("ragged-100", "hf-static", 4.4, 7000), ok("ragged-100", "raytp-graphs", 2.1, 12000),
            {"scenario": "ragged-100", "contender": "raytp-eager", "status": "error", "reason": "x"}]
    add_comparisons(rows, floor_ms=0.5)
    assert rows[2]["x_floor"] == pytest.approx(2.2) and rows[5]["vs_hf_static"] == pytest.approx(12 / 7)
    targets = evaluate_targets(rows, quick=False)
    assert [t["met"] for t in targets] == [True, False, False]
    assert [t["contender"] for t in targets] == ["raytp-graphs"] * 3
    assert [t["met"] for t in evaluate_targets(rows, quick=True)] == [None] * 3


def _has_generate() -> bool:
    import raytp

    return hasattr(raytp, "SamplingParams") and hasattr(raytp.TPCluster, "generate")


@pytest.mark.skipif(not _has_generate(), reason="cluster.generate (issue 15) is not in this raytp yet")
def test_decode_bench_quick_raytp_eager_gives_transformers_tokens(ray_local, tmp_path):
    """--quick on CPU ranks: raytp's eager contender (continuous batching for the ragged
    prompts) gives transformers' greedy tokens for every prompt; the graphs one says CUDA."""
    from raytp.bench.decode import QUICK
    from raytp.cli import main

    path = tmp_path / "decode.json"
    assert main(["bench", "decode", "--quick", "--device", "cpu", "--json", str(path)]) == 0
    rows = {(r["scenario"], r["contender"]): r for r in json.loads(path.read_text())["rows"]}
    for scenario, n in (("batch-1", 1), ("batch-4", 4), ("ragged-10", 10)):
        eager = rows[(scenario, "raytp-eager")]
        assert eager["status"] == "ok", eager["reason"]
        assert eager["same_sequences"] == [n, n], scenario
        # at least one decode step after each prompt's first token
        assert eager["ms_per_step"] > 0 and eager["rounds"][0]["decode_steps"] >= QUICK.new_tokens - 1
        graphs = rows[(scenario, "raytp-graphs")]
        assert graphs["status"] == "skipped" and "CUDA" in graphs["reason"]
