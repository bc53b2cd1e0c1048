"""``raytp bench decode``: generation with transformers against raytp, in one run on the
same GPU, from one checkpoint directory.

The model is :data:`raytp.bench.decode.LLAMA_1B` with seeded random weights, saved with
``LlamaForCausalLM(config).save_pretrained`` and loaded from that directory by both
sides: ``LlamaForCausalLM.from_pretrained`` in this process for the transformers
contenders (:mod:`raytp.bench.decode_hf`), ``raytp.models.pretrained`` on one
``TPCluster`` for both raytp contenders (eager and CUDA graphs, chosen per call). Each
scenario warms every contender up once, then runs ``rounds`` rounds, each contender once
per round in turn. The raytp contenders need ``cluster.generate`` (issue 15); in a raytp
without it their rows say so and ``--only transformers`` runs the rest.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

import raytp
from raytp.bench import decode_report as report
from raytp.bench.decode import DecodeConfig, Scenario, memory_bandwidth, save_random_llama, scenarios
from raytp.bench.decode_hf import HF_CONTENDERS, HFContender, load_model

log = logging.getLogger(__name__)

CONTENDERS = (*HF_CONTENDERS, *report.RAYTP)
GROUPS = {"transformers": HF_CONTENDERS, "raytp": report.RAYTP}
RAGGED_LEFT_OUT = {"hf-dynamic": "left out of the ragged run (its step is measured at the fixed batches)"}


def select(only: tuple[str, ...] | None) -> tuple[str, ...]:
    """Contender names from ``--only`` (names or the groups ``transformers``, ``raytp``)."""
    if not only:
        return CONTENDERS
    chosen = set()
    for name in only:
        if name not in CONTENDERS and name not in GROUPS:
            raise ValueError(f"--only {name!r}: not one of {(*GROUPS, *CONTENDERS)}")
        chosen.update(GROUPS.get(name, (name,)))
    return tuple(c for c in CONTENDERS if c in chosen)


def raytp_missing() -> str | None:
    """Why this raytp cannot run the raytp contenders, or None."""
    if not hasattr(raytp, "SamplingParams") or not hasattr(raytp.TPCluster, "generate"):
        return "this raytp has no cluster.generate / raytp.SamplingParams (issue 15)"
    return None


class RaytpContender:
    """``cluster.generate`` with or without CUDA graphs, on a cluster built for inference."""

    def __init__(self, cluster, cuda_graphs: bool):
        self.cluster, self.cuda_graphs = cluster, cuda_graphs

    def _generate(self, prompts, new_tokens: int) -> tuple[list[list[int]], float]:
        start = time.perf_counter()
        sampling = raytp.SamplingParams(max_new_tokens=new_tokens)
        tokens = self.cluster.generate([list(p) for p in prompts], sampling, cuda_graphs=self.cuda_graphs)
        return tokens, time.perf_counter() - start

    def warm_up(self, scenario: Scenario) -> float:
        """Untimed: with CUDA graphs the whole scenario (as hf-static's warm-up: every bucket
        the timed passes use is captured), else one short call."""
        if self.cuda_graphs:
            start = time.perf_counter()
            self.measure(scenario)
            return time.perf_counter() - start
        return self._generate(scenario.prompts[:scenario.batch], 2)[1]

    def measure(self, scenario: Scenario) -> dict:
        tokens, wall = self._generate(scenario.prompts, scenario.new_tokens)
        stats = self.cluster.generation_stats()
        return {"tokens": tokens, "wall_s": wall, "ttft_s": statistics.mean(stats["first_token_s"]),
                "ms_per_step": stats["decode_s"] / stats["decode_steps"] * 1e3,
                "tokens_per_s": scenario.tokens / wall, "decode_steps": stats["decode_steps"],
                "prefill_s": stats["prefill_s"], "mean_active_slots": stats["mean_active_slots"],
                "engine_wall_s": stats["wall_s"], "cuda_graphs": stats["cuda_graphs"]}


def build_inference(cluster, path: Path, config: DecodeConfig) -> dict:
    """The checkpoint on the cluster's ranks, for inference, with a cache for every scenario."""
    return cluster.build(raytp.models.pretrained(path, dtype=config.dtype), optimizer=None,
                         max_batch=config.slots, max_len=config.max_len,
                         cuda_graphs=cluster.device == "cuda")


def run_scenario(scenario: Scenario, sides: dict, rounds: int) -> list[dict]:
    """Warm each contender up, then ``rounds`` interleaved rounds; rows in ``sides``' order."""
    warm, results, errors = {}, {name: [] for name in sides}, {}
    for name, side in sides.items():
        try:
            warm[name] = side.warm_up(scenario)
            log.info("%s: %s warmed up in %.1f s", scenario.name, name, warm[name])
        except Exception as e:  # noqa: BLE001 - reported in its row
            log.exception("%s: %s failed to warm up", scenario.name, name)
            errors[name] = f"{type(e).__name__}: {e}"
    for _ in range(rounds):
        for name, side in sides.items():
            if name not in errors:
                try:
                    results[name].append(side.measure(scenario))
                except Exception as e:  # noqa: BLE001 - reported in its row
                    log.exception("%s: %s failed", scenario.name, name)
                    errors[name] = f"{type(e).__name__}: {e}"
    ok = [name for name in sides if name not in errors]
    reference = results[ok[0]][-1]["tokens"] if ok else None
    return [report.not_run(scenario.name, name, "error", errors[name]) if name in errors else
            report.row(scenario.name, name, results[name], warm[name], None if name == ok[0] else reference)
            for name in sides]


def _hf_sides(names, path: Path, config: DecodeConfig, device: torch.device) -> dict:
    if not names:
        return {}
    model = load_model(path, config, device)
    held = sum(p.numel() * p.element_size() for p in model.parameters())
    if held != config.weight_bytes():
        raise RuntimeError(f"the checkpoint holds {held} bytes of weights; DecodeConfig counts "
                           f"{config.weight_bytes()}")
    return {name: HFContender(name, model, device) for name in names}


def _raytp_sides(stack: contextlib.ExitStack, names, path: Path, config: DecodeConfig, tp: int, device: str):
    """(contenders, rows of those that cannot run, build info)."""
    missing = raytp_missing()
    if not names or missing:
        return {}, {name: ("skipped", missing) for name in names}, None
    cluster = stack.enter_context(raytp.TPCluster(tp=tp, device=device))
    info = build_inference(cluster, path, config)
    sides, skipped = {}, {}
    for name in names:
        graphs = name == "raytp-graphs"
        if graphs and cluster.device != "cuda":
            skipped[name] = ("skipped", "CUDA graphs need CUDA")
        else:
            sides[name] = RaytpContender(cluster, cuda_graphs=graphs)
    return sides, skipped, info


def pick_scenarios(config: DecodeConfig, names: tuple[str, ...] | None) -> list[Scenario]:
    """The config's scenarios named in ``names`` (all when None); ValueError for an unknown name."""
    every = scenarios(config)
    unknown = set(names or ()) - {s.name for s in every}
    if unknown:
        raise ValueError(f"unknown scenarios {sorted(unknown)}; this config has {[s.name for s in every]}")
    return [s for s in every if not names or s.name in names]


def _device(device: str) -> torch.device:
    cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    return torch.device("cuda" if cuda else "cpu")


def run(config: DecodeConfig, *, contenders: tuple[str, ...] = CONTENDERS, device: str = "auto", tp: int = 1,
        rounds: int = 2, only_scenarios: tuple[str, ...] | None = None, quick: bool = False,
        json_path: str | None = None, command: str = "raytp bench decode") -> dict:
    """The whole bench; prints the table, returns (and writes to ``json_path``) the report."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    hf_device = _device(device)
    chosen = pick_scenarios(config, only_scenarios)
    with tempfile.TemporaryDirectory(prefix="raytp-decode-") as tmp, contextlib.ExitStack() as stack:
        start = time.perf_counter()
        path = save_random_llama(config, Path(tmp) / "llama", hf_device)
        log.info("random checkpoint saved in %.1f s", time.perf_counter() - start)
        bandwidth = memory_bandwidth(hf_device)
        sides = _hf_sides([c for c in contenders if c in HF_CONTENDERS], path, config, hf_device)
        raytp_sides, skipped, info = _raytp_sides(stack, [c for c in contenders if c in report.RAYTP], path,
                                                  config, tp, device)
        sides.update(raytp_sides)
        rows = []
        for scenario in chosen:
            left_out = RAGGED_LEFT_OUT if scenario.name.startswith("ragged") else {}
            active = {n: s for n, s in sides.items() if n not in left_out}
            rows += run_scenario(scenario, active, rounds)
            rows += [report.not_run(scenario.name, n, "skipped", why)
                     for n, why in left_out.items() if n in sides]
            rows += [report.not_run(scenario.name, n, status, why) for n, (status, why) in skipped.items()]
        hf_model = next((s.model for s in sides.values() if isinstance(s, HFContender)), None)
    result = {"meta": _meta(config, command, hf_device, bandwidth, rounds, tp, info, hf_model), "rows": rows}
    report.add_comparisons(rows, result["meta"]["floor_ms"])
    result["targets"] = report.evaluate_targets(rows, quick)
    print(report.table(result))
    if json_path:
        with open(json_path, "w") as f:
            json.dump(result, f, indent=1)
        print(f"results written to {json_path}")
    return result


def _meta(config: DecodeConfig, command: str, device: torch.device, bandwidth: dict, rounds: int, tp: int,
          build_info: dict | None, hf_model) -> dict:
    import transformers

    weight_bytes = config.weight_bytes()
    bw = bandwidth["bytes_per_s"]
    compile_config = getattr(getattr(hf_model, "generation_config", None), "compile_config", None)
    now = datetime.datetime.now(datetime.timezone.utc)
    return {"command": command, "date": now.isoformat(timespec="seconds"), "device": device.type,
            "tp": tp, "rounds": rounds,
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "torch": torch.__version__, "transformers": transformers.__version__,
            "model": {k: getattr(config, k) for k in ("d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff",
                                                       "vocab_size", "dtype")},
            "prompt_len": config.prompt_len, "new_tokens": config.new_tokens, "slots": config.slots,
            "ragged": [config.ragged_prompts, config.ragged_min, config.ragged_max],
            "weight_bytes": weight_bytes, "bandwidth": bandwidth,
            "floor_ms": weight_bytes / bw * 1e3 if bw else None,
            "hf_compile_config": None if compile_config is None else repr(compile_config),
            "generation": (build_info or {}).get("generation")}
