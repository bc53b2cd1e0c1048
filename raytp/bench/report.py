"""Tables of ``raytp bench`` results, and ``docs/benchmarks.md`` from a results JSON.

    python -m raytp.bench.report results.json > docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import json
import sys

from raytp.bench.results import evaluate_targets

GIB = 2**30


def _f(value, fmt: str = ".2f", suffix: str = "") -> str:
    return "n/a" if value is None else f"{value:{fmt}}{suffix}"


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _collectives(row: dict) -> str:
    kinds = row.get("collectives")
    return ", ".join(f"{k} {v}" for k, v in sorted(kinds.items())) if kinds else "n/a"


def results_table(results: dict) -> str:
    """One row per workload x contender (the no-collective baselines in the exposed column)."""
    out = []
    for r in results["rows"]:
        if r["baseline"]:
            continue
        if r["status"] != "ok":
            out.append([r["workload"], r["contender"]] + [""] * 7 + [f"{r['status']}: {r['reason']}"])
            continue
        exposed = (f"{r['exposed_comm_ms']:.2f} (of {r['ms']:.2f}; {r['compute_only_ms']:.2f} no-comm)"
                   if r["exposed_comm_ms"] is not None else "n/a")
        out.append([r["workload"], r["contender"], f"{r['ms']:.3f}", f"{r['ms_min']:.3f}-{r['ms_max']:.3f}",
                    _f(r["tflops"], ".1f"), _f(r["mfu"] and 100 * r["mfu"], ".1f", "%"), exposed,
                    _f(r["speedup_vs_one_gpu"], ".2f", "x"), _f(r["ratio_vs_torch_tp"], ".2f", "x"),
                    _collectives(r)])
    header = ["workload", "contender", "ms/step (median)", "min-max", "TFLOP/s/GPU", "MFU",
              "exposed comm ms", "vs one GPU", "vs PyTorch TP", "collectives/step (or status)"]
    return _table(header, out)


def workloads_list(results: dict) -> str:
    seen = {}
    for r in results["rows"]:
        seen.setdefault(r["workload"], f"- `{r['workload']}`: {r['label']}; {r['flops'] / 1e9:,.1f} GFLOP "
                                       "per step (model FLOPs)")
    return "\n".join(seen.values())


def memory_table(results: dict) -> str:
    """Per-rank parameter + AdamW state bytes of the GPT against the whole model's."""
    rows = [r for r in results["rows"] if r.get("memory_per_rank") and not r["baseline"]]
    full = next((r for r in rows if r["contender"] == "one-gpu"), None)
    full_bytes = full["memory_per_rank"][0]["state_bytes"] if full else None
    tp = results["meta"]["tp"]
    out = []
    for r in rows:
        m = max(r["memory_per_rank"], key=lambda m: m["state_bytes"])
        expected = None
        if full_bytes and r["contender"] != "one-gpu":
            rep = m["replicated_state_bytes"]
            expected = (full_bytes - rep) / tp + rep
        peak = m.get("peak_step_bytes")
        out.append([r["workload"], r["contender"], _f(m["param_bytes"] / GIB, ".3f"),
                    _f(m["optim_bytes"] / GIB, ".3f"), _f(m["state_bytes"] / GIB, ".3f"),
                    _f(expected and expected / GIB, ".3f"),
                    _f(full_bytes and m["state_bytes"] / full_bytes, ".3f"),
                    _f(peak and peak / GIB, ".2f")])
    header = ["workload", "contender", "params GiB/rank", "AdamW state GiB/rank", "params+state GiB/rank",
              "expected: full/tp + replicated", "fraction of one GPU's", "peak during steps GiB"]
    return _table(header, out)


def control_plane_table(control: dict) -> str:
    rows = [[r["model"], _f(r["in_actor_ms"]), _f(r["driver_pipelined_ms"]), _f(r["pipelined_ratio"], ".3f"),
             _f(r.get("pipelined_idle_ms")), _f(r["driver_blocking_ms"]), _f(r["blocking_ratio"], ".3f"),
             _f(r.get("blocking_idle_ms")), _f(r.get("blocking_host_ms")), _f(r.get("phases_ms"))]
            for r in control.get("rows", [])]
    return _table(["step", "in-actor loop ms", "driver fit() ms", "ratio", "rank idle between calls ms",
                   "driver train_step ms", "ratio", "rank idle between calls ms", "rank host ms per step",
                   "GPU phases ms"], rows)


def launcher_table(torchrun: dict) -> str:
    rows = [[c["workload"], c["contender"], _f(c["ray_ms"], ".3f"), _f(c["torchrun_ms"], ".3f"),
             _f(c["ratio"], ".3f")] for c in torchrun.get("comparison", [])]
    return _table(["workload", "contender", "Ray actors ms", "torchrun ms", "ratio"], rows)


def targets_table(targets: list[dict]) -> str:
    verdict = {True: "met", False: "MISSED", None: "not measured"}
    rows = [[t["target"], _f(t["value"], ".3f"), ("<= " if t["at_most"] else ">= ") + f"{t['threshold']}",
             verdict[t["met"]], t["note"]] for t in targets]
    return _table(["target (issue 5)", "measured", "needed", "result", "how"], rows)


def render(results: dict) -> str:
    """The whole report as markdown (what the CLI prints, and docs/benchmarks.md)."""
    meta = results["meta"]
    targets = results.get("targets") or evaluate_targets(results)
    parts = [
        "# raytp benchmarks",
        f"- device: {meta['device_name']} x {meta['tp']} (tp={meta['tp']}), torch {meta['torch']}, "
        f"{meta['dtype']}",
        f"- command: `{meta.get('command', 'n/a')}`",
        f"- date: {meta.get('date', 'n/a')}",
        f"- timing: median over {meta['options']['iters']} steps of the slowest rank's step time "
        f"(CUDA events on GPU, perf_counter on CPU) after {meta['options']['warmup']} warm-up steps; "
        f"MLP and block contenders interleaved in {meta['options']['rounds']} rounds",
        "", "## Targets", "", targets_table(targets),
        "", "## Workloads", "", workloads_list(results),
        "", "## Workloads x contenders", "", results_table(results),
    ]
    if any(r.get("memory_per_rank") for r in results["rows"]):
        parts += ["", "## Memory of the GPT step (parameters + AdamW state, per rank)", "",
                  memory_table(results)]
    control = results.get("control_plane")
    if control:
        parts += ["", "## Control plane: driver-coordinated steps against the in-actor loop", ""]
        parts += [control_plane_table(control)] if control.get("rows") else [f"{control.get('status')}"]
    torchrun = results.get("torchrun")
    if torchrun:
        parts += ["", "## Ray actors against torchrun (same per-rank code)", ""]
        parts += [launcher_table(torchrun)] if torchrun.get("comparison") else [f"{torchrun.get('status')}"]
    parts += ["", "## How it is measured", "", METHOD]
    return "\n".join(parts) + "\n"


METHOD = """\
- one-gpu: the plain PyTorch model (`raytp/bench/reference.py`) on TP rank 0 alone.
- torch-tp: the same model through `torch.distributed.tensor.parallel.parallelize_module`
  (torchtitan's plan: colwise wq/wk/wv/w1/w3, rowwise wo/w2; SequenceParallel norms and
  PrepareModuleInput for the SP blocks; rowwise embedding, colwise LM head with
  `loss_parallel` for the GPT).
- raytp / raytp-overlap / raytp-cupy: raytp's ParallelMLP, Block and GPT holding the
  same weights, on torch.distributed, with overlap, and on CuPy NCCL (with overlap where
  raytp has it). raytp-symm-mem: raytp-overlap with the sequence-parallel all-gather ->
  GEMM and GEMM -> reduce-scatter pairs through torch's fused symmetric-memory ops
  (`raytp.nn.use_symm_mem`); SP workloads only, skipped where the GPUs cannot run them.
- A step: forward + backward against a fixed output gradient, the input requiring its
  gradient (MLP, block); forward + cross-entropy + backward + AdamW (foreach) for the GPT.
- Model FLOPs: MLP `12 T h f`; block `6 P T + 12 T^2 d` (P: matmul weights, attention
  not discounted for causality); GPT `B T (6 P + 12 L d T)` (P includes the LM head).
  TFLOP/s is per GPU used (1 for one-gpu, tp otherwise); MFU against the datasheet
  dense bf16 peak.
- Exposed communication: the raytp step minus the same step on a communicator that
  issues no collectives (`raytp/bench/nullcomm.py`; same kernels, collectives skipped),
  at the same overlap setting. n/a for PyTorch TP.
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m raytp.bench.report", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", help="the JSON written by `raytp bench --json`")
    args = parser.parse_args(argv)
    with open(args.results) as f:
        sys.stdout.write(render(json.load(f)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
