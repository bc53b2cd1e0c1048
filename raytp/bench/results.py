"""From the ranks' raw measurements to result rows, and the targets of GitHub issue 5.

A row is one workload x contender: its status (``ok``, ``skipped``, ``error``), the
median over the timed steps of the slowest rank's step time, model TFLOP/s per GPU and
MFU, exposed communication (raytp contenders: the step less the same step with no
collectives), speedup over one GPU and ratio to PyTorch's TP, the collectives of one
step, and for the GPT the per-rank memory of parameters and optimizer state.
"""

from __future__ import annotations

import math

from raytp.bench.contenders import NO_COMM, RAYTP
from raytp.bench.timing import median, slowest_per_step

CONTROL_PLANE_MIN_MS = 20.0  # issue 5 judges the driver's overhead on steps this long
LAUNCHER_MIN_MS = 10.0  # Ray against torchrun: shorter steps are too noisy to compare at 3%


def combine(per_rank: list[dict]) -> dict:
    """``{"meta": ..., "rows": [...]}`` from :func:`raytp.bench.runner.run_rank`'s results, in rank order."""
    first = per_rank[0]
    meta = {k: first[k] for k in ("tp", "device", "device_name", "peak_flops", "torch", "dtype", "options")}
    rows = []
    for i, wl in enumerate(first["workloads"]):
        entries = [pr["workloads"][i]["entries"] for pr in per_rank]
        rows += _workload_rows(wl, entries, first["tp"], first["peak_flops"])
    return {"meta": meta, "rows": rows}


def _status(per_rank: list[dict]) -> tuple[str, str | None]:
    for e in per_rank:
        if e["status"] in ("skipped", "error"):
            return e["status"], e["reason"]
    if any(e["status"] != "ok" for e in per_rank):
        return "error", "failed on a rank"
    return "ok", None


def _workload_rows(wl: dict, entries: list[dict], tp: int, peak: float | None) -> list[dict]:
    rows = {}
    for name in entries[0]:
        es = [e[name] for e in entries]
        status, reason = _status(es)
        steps = slowest_per_step([e["times_ms"] for e in es]) if status == "ok" else []
        gpus = 1 if name == "one-gpu" else tp
        ms = median(steps)
        tflops = wl["flops"] / (ms * 1e-3) / gpus / 1e12 if ms else None
        rows[name] = {
            "workload": wl["name"], "label": wl["label"], "kind": wl["kind"], "tokens": wl["tokens"],
            "flops": wl["flops"], "contender": name, "baseline": name in NO_COMM.values(),
            "status": status, "reason": reason, "ms": ms, "ms_min": min(steps, default=None),
            "ms_max": max(steps, default=None), "steps": len(steps), "step_ms": steps, "gpus": gpus,
            "tflops": tflops,
            "mfu": tflops * 1e12 / peak if tflops and peak else None,
            "overlap": next((e["overlap"] for e in es if e["overlap"] is not None), None),
            "collectives": es[0].get("collectives"), "comm_bytes": es[0].get("comm_bytes"),
        }
        memory = [e["memory"] for e in es if e.get("memory")]
        if memory:
            rows[name]["memory_per_rank"] = memory
    _relate(rows)
    return list(rows.values())


def _relate(rows: dict[str, dict]) -> None:
    """Speedup over one GPU, ratio to PyTorch TP, and exposed communication."""
    def ok_ms(name):
        row = rows.get(name)
        return row["ms"] if row and row["status"] == "ok" else None

    one, torch_tp = ok_ms("one-gpu"), ok_ms("torch-tp")
    for name, row in rows.items():
        ms = row["ms"]
        row["speedup_vs_one_gpu"] = one / ms if one and ms else None
        row["ratio_vs_torch_tp"] = ms / torch_tp if torch_tp and ms else None
        compute = ok_ms(NO_COMM[bool(row["overlap"])]) if name in RAYTP else None
        row["compute_only_ms"] = compute
        row["exposed_comm_ms"] = ms - compute if ms and compute else None


def compare_launchers(ray_rows: list[dict], torchrun_rows: list[dict]) -> list[dict]:
    """Each workload x contender timed both in Ray actors and under torchrun."""
    under_torchrun = {(r["workload"], r["contender"]): r for r in torchrun_rows if r["status"] == "ok"}
    out = []
    for r in ray_rows:
        other = under_torchrun.get((r["workload"], r["contender"]))
        if r["status"] == "ok" and other is not None and r["ms"] and other["ms"]:
            out.append({"workload": r["workload"], "contender": r["contender"], "ray_ms": r["ms"],
                        "torchrun_ms": other["ms"], "ratio": r["ms"] / other["ms"]})
    return out


def _target(name: str, threshold: float, at_most: bool, value: float | None, note: str) -> dict:
    met = None if value is None else (value <= threshold if at_most else value >= threshold)
    return {"target": name, "threshold": threshold, "at_most": at_most, "value": value, "met": met,
            "note": note}


def _row(rows, workload, contender) -> dict | None:
    return next((r for r in rows if r["workload"] == workload and r["contender"] == contender
                 and r["status"] == "ok"), None)


def _why_missing(rows, workload, contender) -> str:
    row = next((r for r in rows if r["workload"] == workload and r["contender"] == contender), None)
    return "not run" if row is None else f"{row['status']}: {row['reason']}"


def evaluate_targets(results: dict) -> list[dict]:
    """The targets of issue 5, each met (True), missed (False) or not measured (None)."""
    rows = [r for r in results.get("rows", []) if not r["baseline"]]
    out = []
    big = _row(rows, "mlp-8192", "raytp-overlap")
    note = "raytp-overlap, mlp-8192" if big else _why_missing(rows, "mlp-8192", "raytp-overlap")
    out.append(_target("MLP 8192/32768/8192: raytp with overlap <= 0.95x PyTorch TP", 0.95, True,
                       big and big["ratio_vs_torch_tp"], note))
    out.append(_target("MLP 8192/32768/8192: raytp with overlap >= 1.9x one GPU", 1.9, False,
                       big and big["speedup_vs_one_gpu"], note))
    small = [r for c in RAYTP if (r := _row(rows, "mlp-2048", c)) and r["ratio_vs_torch_tp"]]
    best = min(small, key=lambda r: r["ratio_vs_torch_tp"], default=None)
    out.append(_target("MLP 2048/8192/2048: raytp <= 0.5x PyTorch TP", 0.5, True,
                       best and best["ratio_vs_torch_tp"],
                       f"best raytp contender: {best['contender']}" if best else "no raytp/PyTorch TP pair"))
    out.append(_control_plane_target(results.get("control_plane")))
    out.append(_launcher_target(results.get("torchrun")))
    return out


def _control_plane_target(control: dict | None) -> dict:
    name = "driver-coordinated train_step <= 1.02x the in-actor loop (steps >= 20 ms)"
    runs = [r for r in (control or {}).get("rows", []) if r["in_actor_ms"] >= CONTROL_PLANE_MIN_MS]
    if not runs:
        return _target(name, 1.02, True, None, "no step of 20 ms or more measured")
    worst = max(runs, key=lambda r: r["blocking_ratio"])
    return _target(name, 1.02, True, worst["blocking_ratio"],
                   f"blocking train_step, {worst['model']} ({worst['in_actor_ms']:.1f} ms in-actor); "
                   f"pipelined fit(): {worst['pipelined_ratio']:.3f}x")


def _launcher_target(torchrun: dict | None) -> dict:
    name = "raytp in Ray actors <= 1.03x the same under torchrun"
    pairs = [c for c in (torchrun or {}).get("comparison", [])
             if c["contender"] in RAYTP and c["torchrun_ms"] >= LAUNCHER_MIN_MS]
    if not pairs:
        status = (torchrun or {}).get("status", "not run")
        return _target(name, 1.03, True, None,
                       f"no raytp step of {LAUNCHER_MIN_MS:g} ms or more in both ({status})")
    geomean = math.exp(sum(math.log(c["ratio"]) for c in pairs) / len(pairs))
    return _target(name, 1.03, True, geomean,
                   f"geometric mean over {len(pairs)} raytp rows >= {LAUNCHER_MIN_MS:g} ms; worst "
                   f"{max(c['ratio'] for c in pairs):.3f}x")
