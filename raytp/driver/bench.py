"""``raytp bench``: every contender on the same GPUs in one run, through the Ray rank
actors; then the control plane (driver-coordinated steps against the in-actor loop),
and the same per-rank code under ``torchrun`` for comparison. Prints the report and
writes the full JSON.

Order: the Ray cluster runs :func:`raytp.bench.runner.run_rank` on every rank, then
the control-plane steps, and is closed; then ``torchrun`` runs the same per-rank
function on the same GPUs as a subprocess (one launcher at a time on the GPUs).
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

import raytp
from raytp.bench import convert
from raytp.bench.report import render
from raytp.bench.results import combine, compare_launchers, evaluate_targets
from raytp.bench.runner import BenchOptions, run_rank
from raytp.bench.workloads import GPTWorkload, full_workloads, quick_workloads
from raytp.driver.overhead import measure_model

log = logging.getLogger(__name__)

# NVLink multicast stays off in the ranks and in torchrun's processes alike
NO_MULTICAST = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
ROOT = Path(__file__).resolve().parents[2]


def _bench_on_rank(actor, options: BenchOptions) -> dict:
    return run_rank(actor.mesh, options)


def run(options: BenchOptions, *, tp: int = 2, device: str = "auto", json_path: str | None = None,
        control_plane: bool = True, torchrun: bool = True, command: str | None = None,
        torchrun_timeout_s: float = 300.0) -> dict:
    """The whole benchmark; returns (and writes to ``json_path``) the results dict."""
    for key, value in NO_MULTICAST.items():
        os.environ.setdefault(key, value)
    with raytp.TPCluster(tp=tp, device=device, phase_timeout_s=420.0) as cluster:
        results = combine(cluster.run(_bench_on_rank, options))
        results["meta"].update(
            launcher="ray", command=command or "raytp bench", host_device=cluster.device,
            date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
        if control_plane:
            results["control_plane"] = _control_plane(cluster, options)
        device = cluster.device
    if torchrun:
        results["torchrun"] = run_torchrun(options, tp, device, results["rows"], torchrun_timeout_s)
    results["targets"] = evaluate_targets(results)
    if json_path:
        with open(json_path, "w") as f:
            json.dump(results, f, indent=1)
    return results


def _control_plane(cluster, options: BenchOptions) -> dict:
    """The GPT workload's training step (raytp, AdamW, through RankEngine) coordinated by the
    driver against the same step looped in the actors."""
    w = _gpt_workload(options)
    dtype = options.torch_dtype(_torch_device(cluster.device))
    rng = np.random.default_rng(options.seed)
    batch = {"input_ids": rng.integers(0, w.vocab_size, (w.batch, w.seq_len), dtype=np.int64)}
    try:
        row = measure_model(cluster, convert.gpt_config(w, dtype), batch, options.iters,
                            warmup=min(3, max(1, options.warmup)), name=f"raytp {w.label}",
                            optimizer=raytp.AdamW(lr=1e-4), seed=options.seed)
    except Exception as e:  # noqa: BLE001 - reported in the results
        log.exception("control-plane measurement failed")
        return {"status": f"error: {type(e).__name__}: {e}", "rows": []}
    return {"status": "ok", "rows": [row]}


def _gpt_workload(options: BenchOptions) -> GPTWorkload:
    """The selected GPT workload, or else the GPT of the quick or full sizes."""
    pool = options.selected() + (quick_workloads() if options.quick else full_workloads())
    return next(w for w in pool if isinstance(w, GPTWorkload))


def _torch_device(name: str):
    import torch

    return torch.device("cuda" if name == "cuda" else "cpu")


def torchrun_command(options: BenchOptions, tp: int, device: str, json_path: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={tp}",
            "-m", "raytp.bench.torchrun_entry", "--json", json_path, "--device", device,
            "--options", json.dumps(options.to_dict())]


def run_torchrun(options: BenchOptions, tp: int, device: str, ray_rows: list[dict],
                 timeout_s: float = 600.0) -> dict:
    """The same per-rank bench under ``torchrun --standalone``; its rows and the comparison
    with ``ray_rows``. A failure is reported in the result, not raised."""
    env = {**os.environ, **NO_MULTICAST}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    with tempfile.TemporaryDirectory(prefix="raytp-bench-") as tmp:
        out_path = os.path.join(tmp, "torchrun.json")
        cmd = torchrun_command(options, tp, device, out_path)
        log.info("running the same bench under torchrun: %s", " ".join(cmd[:8]) + " ...")
        proc, output = _run_group(cmd, env, timeout_s)
        if proc is None:
            return {"status": f"error: torchrun took more than {timeout_s:g}s", "log_tail": _tail(output)}
        if proc.returncode != 0 or not os.path.exists(out_path):
            return {"status": f"error: torchrun exited with {proc.returncode}", "log_tail": _tail(output)}
        with open(out_path) as f:
            data = json.load(f)
    return {"status": "ok", "command": " ".join(cmd[:7]) + " ...", "meta": data["meta"], "rows": data["rows"],
            "comparison": compare_launchers(ray_rows, data["rows"])}


def _run_group(cmd: list[str], env: dict, timeout_s: float):
    """Run ``cmd`` in its own process group; at the deadline kill the whole group (torchrun
    and its workers, which hold the GPUs). Returns (process or None on timeout, output)."""
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=timeout_s)
        return proc, output
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        return None, output


def _tail(text: str, n: int = 4000) -> str:
    return text[-n:]


def main(options: BenchOptions, *, tp: int, device: str, json_path: str | None, control_plane: bool,
         torchrun: bool, command: str) -> dict:
    """Run, print the report (markdown), write the JSON."""
    results = run(options, tp=tp, device=device, json_path=json_path, control_plane=control_plane,
                  torchrun=torchrun, command=command)
    print(render(results))
    tail = (results.get("torchrun") or {}).get("log_tail")
    if tail:
        print(f"torchrun's output ended with:\n{tail}", file=sys.stderr)
    if json_path:
        print(f"results written to {json_path}")
    return results
