"""``raytp bench recipe``: one training step of a Llama-style model under each setting
of the training recipe, in one run on the same GPUs — pure bf16, mixed precision (fp32
master weights), mixed + selective / full activation checkpointing, mixed + compiled
blocks, and mixed + full checkpointing around compiled blocks. Reports ms/step, TFLOP/s, MFU, peak
memory and the activation memory (peak minus what the rank holds between steps).

The default model is the issue's 1.1B Llama: d_model 2048, 22 layers, 32 heads, 4 KV
heads, ffn 5632, vocab 32000, 4 x 2048 tokens; ``--quick`` is a tiny one for CPUs.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import statistics

import numpy as np

import raytp
from raytp.compile import CompileOptions
from raytp.models import GPTConfig

log = logging.getLogger(__name__)

LLAMA_1B = GPTConfig(vocab_size=32000, n_layers=22, n_heads=32, n_kv_heads=4, d_model=2048, d_ff=5632,
                     max_seq_len=2048, norm="rmsnorm", activation="swiglu", positions="rope",
                     tie_embeddings=False, bias=False, dtype="bfloat16")
TINY = dataclasses.replace(LLAMA_1B, vocab_size=512, n_layers=2, n_heads=4, n_kv_heads=2, d_model=64,
                           d_ff=128, max_seq_len=64, dtype="float32")
MIXED = raytp.MixedPrecision(param_dtype="bfloat16", master_dtype="float32", reduce_dtype="float32")


def settings(config: GPTConfig, device: str, compile_backend: str = "inductor") -> dict[str, dict]:
    """The recipe's settings, as build options (the config's dtype for pure bf16); the
    compiled ones use ``compile_backend``."""
    compiled = CompileOptions(backend=compile_backend)
    compute = "bfloat16" if device == "cuda" else "float32"
    pure = dataclasses.replace(config, dtype=compute)
    master = dataclasses.replace(config, dtype="float32")
    out = {"bf16": {"model": pure},
           "mixed": {"model": master, "precision": MIXED},
           "mixed+selective": {"model": master, "precision": MIXED, "activation_checkpointing": "selective"},
           "mixed+full": {"model": master, "precision": MIXED, "activation_checkpointing": "full"}}
    out["mixed+compile"] = {"model": master, "precision": MIXED, "compile": compiled}
    out["mixed+full+compile"] = {"model": master, "precision": MIXED, "activation_checkpointing": "full",
                                 "compile": compiled}
    return out


def _median(rows: list[dict], key: str):
    values = [r[key] for r in rows if r.get(key) is not None]
    return statistics.median(values) if values else None


def measure(cluster, options: dict, batch: dict, warmup: int, steps: int) -> dict:
    cluster.build(optimizer=raytp.AdamW(lr=1e-4, fused=cluster.device == "cuda"), seed=0, **options)
    first = cluster.train_step(batch)  # the same weights and batch in every setting
    for _ in range(warmup - 1):
        cluster.train_step(batch)
    rows = [cluster.train_step(batch) for _ in range(steps)]
    held = cluster.run("memory_bytes")[0].get("allocated_bytes")  # params, masters, optimizer state
    peak = max(r["peak_mem_bytes"] or 0 for r in rows)
    return {"ms_per_step": _median(rows, "step_s") * 1e3, "tflops": _median(rows, "tflops"),
            "mfu": _median(rows, "mfu"), "peak_mem_gib": peak / 2**30,
            "activation_gib": (peak - held) / 2**30 if held is not None and peak else None,
            "first_loss": first["loss"], "first_grad_norm": first["grad_norm"], "loss": rows[-1]["loss"]}


def run(tp: int = 1, device: str = "auto", quick: bool = False, warmup: int = 3, steps: int = 10,
        batch_size: int = 4, json_path: str | None = None, command: str = "raytp bench recipe",
        only: tuple[str, ...] | None = None, compile_backend: str = "inductor") -> dict:
    config = TINY if quick else LLAMA_1B
    known = settings(config, "cpu")
    unknown = sorted(set(only or ()) - set(known))
    if unknown:
        raise ValueError(f"settings {unknown} are not among {list(known)}")
    ids = np.random.default_rng(0).integers(0, config.vocab_size, (batch_size, config.max_seq_len))
    results = {}
    with raytp.TPCluster(tp=tp, device=device) as cluster:
        for name, options in settings(config, cluster.device, compile_backend).items():
            if only and name not in only:
                continue
            log.info("recipe bench: %s", name)
            results[name] = measure(cluster, options, {"input_ids": ids}, warmup, steps)
        device = cluster.device
    report = {"command": command, "tp": tp, "device": device, "tokens_per_step": int(ids.size),
              "compile_backend": compile_backend,
              "model": {k: getattr(config, k) for k in ("n_layers", "d_model", "n_heads", "n_kv_heads",
                                                         "d_ff", "vocab_size")},
              "settings": results}
    print(table(report))
    if json_path:
        with open(json_path, "w") as f:
            json.dump(report, f, indent=1)
    return report


def table(report: dict) -> str:
    base_name = "bf16" if "bf16" in report["settings"] else next(iter(report["settings"]))
    base = report["settings"][base_name]["ms_per_step"]
    lines = [f"`{report['command']}` on {report['device']}, tp={report['tp']}, "
             f"{report['tokens_per_step']} tokens/step, model {report['model']}", "",
             f"| setting | ms/step | vs {base_name} | TFLOP/s | MFU | peak GiB | activation GiB | "
             "step-1 loss | step-1 grad norm | last loss |", "|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in report["settings"].items():
        cells = [f"{r['ms_per_step']:.1f}", f"{r['ms_per_step'] / base:.3f}x", _fmt(r["tflops"], "{:.0f}"),
                 _fmt(r["mfu"], "{:.1%}"), f"{r['peak_mem_gib']:.2f}", _fmt(r["activation_gib"], "{:.2f}"),
                 f"{r['first_loss']:.6f}", f"{r['first_grad_norm']:.6f}", f"{r['loss']:.4f}"]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _fmt(value, pattern: str) -> str:
    return "n/a" if value is None else pattern.format(value)
