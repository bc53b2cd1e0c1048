"""Rows, targets and the table of ``raytp bench decode``.

A row is one scenario x contender: the medians over the timed rounds of ms per decode
step, of the wall time (tokens/s: the new tokens over it) and of the time to first token
(mean over the prompts), the warm-up's seconds (transformers' compile is in it), and how
many sequences equal the reference contender's (greedy; in bf16 near-ties of random
weights may differ, in float32 on CPU they must not).
"""

from __future__ import annotations

import statistics

# (scenario, what, comparison, bound, words): issue 15's targets, one H200, tp=1
TARGETS = (("batch-1", "ms_per_step", "<=", 1.2, "batch 1 <= 1.2 ms/token"),
           ("batch-32", "ms_per_step", "<=", 2.0, "batch 32 <= 2.0 ms/step"),
           ("ragged-100", "vs_hf_static", ">=", 1.8, "ragged 100 prompts >= 1.8x transformers static "
                                                     "(batch 32) in tokens/s"))
RAYTP = ("raytp-eager", "raytp-graphs")
METRICS = ("ms_per_step", "ttft_s", "wall_s")


def row(scenario: str, contender: str, rounds: list[dict], warmup_s: float, reference: list | None) -> dict:
    """The row of ``rounds`` (each a contender's measurement of one timed pass)."""
    out = {"scenario": scenario, "contender": contender, "status": "ok", "reason": None,
           "warmup_s": warmup_s, "rounds": [{k: v for k, v in r.items() if k != "tokens"} for r in rounds],
           **{k: statistics.median(r[k] for r in rounds) for k in METRICS}}
    tokens = rounds[-1]["tokens"]
    out["tokens_per_s"] = sum(len(t) for t in tokens) / out["wall_s"]  # over the median wall time
    # a missing or extra sequence counts as different (zip stops at the shorter)
    out["same_sequences"] = None if reference is None else [
        sum(a == b for a, b in zip(tokens, reference, strict=False)), len(reference)]
    return out


def not_run(scenario: str, contender: str, status: str, reason: str) -> dict:
    return {"scenario": scenario, "contender": contender, "status": status, "reason": reason}


def add_comparisons(rows: list[dict], floor_ms: float | None) -> None:
    """Each ok row's ratio to the floor, and its tokens/s over hf-static's in its scenario."""
    static = {r["scenario"]: r["tokens_per_s"] for r in rows
              if r["contender"] == "hf-static" and r["status"] == "ok"}
    for r in rows:
        if r["status"] != "ok":
            continue
        r["x_floor"] = r["ms_per_step"] / floor_ms if floor_ms else None
        base = static.get(r["scenario"])
        r["vs_hf_static"] = r["tokens_per_s"] / base if base else None


def evaluate_targets(rows: list[dict], quick: bool) -> list[dict]:
    """Each target judged on the best raytp row of its scenario (None: not measured, or quick)."""
    out = []
    for scenario, key, op, bound, words in TARGETS:
        ran = [r for r in rows if r["scenario"] == scenario and r["contender"] in RAYTP
               and r["status"] == "ok" and r.get(key) is not None]
        best = (min if op == "<=" else max)(ran, key=lambda r: r[key], default=None)
        value = best[key] if best else None
        met = None if quick or value is None else (value <= bound if op == "<=" else value >= bound)
        out.append({"target": words, "scenario": scenario, "metric": key, "bound": bound, "value": value,
                    "contender": best["contender"] if best else None, "met": met})
    return out


def _f(value, fmt: str) -> str:
    return "n/a" if value is None else format(value, fmt)


def _header(meta: dict) -> list[str]:
    bandwidth = meta["bandwidth"]
    tbps = bandwidth["bytes_per_s"] and bandwidth["bytes_per_s"] / 1e12
    n, shortest, longest = meta["ragged"]
    return [f"`{meta['command']}` on {meta['device_name']} (torch {meta['torch']}, transformers "
            f"{meta['transformers']}), {meta['date']}, tp={meta['tp']}",
            f"model {meta['model']}: {meta['weight_bytes'] / 1e9:.2f} GB of weights",
            f"prompt {meta['prompt_len']}, {meta['new_tokens']} new tokens; ragged: {n} prompts of "
            f"{shortest}..{longest} tokens through {meta['slots']} slots; {meta['rounds']} timed round(s)",
            f"floor: {_f(meta['floor_ms'], '.3f')} ms/step = weight bytes / {_f(tbps, '.2f')} TB/s "
            f"({bandwidth['source']})"]


def _contender(r: dict) -> str:
    if r["contender"] == "raytp-graphs" and r["rounds"][-1].get("cuda_graphs") is False:
        return "raytp-graphs (ran eager: capture failed)"
    return r["contender"]


def table(report: dict) -> str:
    lines = [*_header(report["meta"]), "",
             "| scenario | contender | ms/decode step | x floor | tokens/s | vs hf-static | TTFT ms | "
             "same tokens as ref | warm-up s |", "|---|---|---|---|---|---|---|---|---|"]
    for r in report["rows"]:
        if r["status"] != "ok":
            lines.append(f"| {r['scenario']} | {r['contender']} | {r['status']}: {r['reason']} |||||||")
            continue
        same = "ref" if r["same_sequences"] is None else "{}/{}".format(*r["same_sequences"])
        cells = [_f(r["ms_per_step"], ".3f"), _f(r.get("x_floor"), ".2f"), _f(r["tokens_per_s"], ",.0f"),
                 _f(r.get("vs_hf_static"), ".2f"), _f(r["ttft_s"] * 1e3, ".1f"), same,
                 _f(r["warmup_s"], ".1f")]
        lines.append(f"| {r['scenario']} | {_contender(r)} | " + " | ".join(cells) + " |")
    lines += ["", "Targets (one H200, tp=1):"]
    for t in report["targets"]:
        verdict = {True: "**met**", False: "**missed**", None: "not judged"}[t["met"]]
        who = t["contender"] or "no raytp row"
        lines.append(f"- {t['target']}: {verdict} ({who}: {_f(t['value'], '.3f')})")
    return "\n".join(lines)
