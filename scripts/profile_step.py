"""Where one training step's GPU time goes: the recipe bench's model, one rank, no Ray.

    python3 scripts/profile_step.py --setting bf16 --out $OUT/profile

Builds the rank with ``raytp.engine.build_engine`` in this process (a world of one),
times forward, backward and the optimizer step with CUDA events, then profiles two
steps with ``torch.profiler`` and prints the kernels grouped by kind (GEMM, attention,
elementwise, reductions, optimizer, copies), the top kernels, and a Chrome trace.
"""

import argparse
import collections
import os

import numpy as np
import torch

import raytp
from raytp.driver.recipe import LLAMA_1B, settings
from raytp.engine import BuildSpec, build_engine

KINDS = (("gemm", ("gemm", "cutlass", "nvjet", "sm90_xmma", "cublas", "matmul")),
         ("attention", ("flash", "fmha", "attention", "sdpa")),
         ("optimizer", ("multi_tensor", "adam", "foreach")),
         ("nccl", ("nccl",)),
         ("copy", ("copy", "memcpy", "memset", "cat", "fill")),
         ("reduction", ("reduce", "softmax", "norm", "sum", "max", "log")))


def kind_of(name: str) -> str:
    low = name.lower()
    for kind, keys in KINDS:
        if any(k in low for k in keys):
            return kind
    return "elementwise/other"


def build(setting: str, batch_size: int):
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29533")
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    raytp.init_distributed()
    options = settings(LLAMA_1B, "cuda")[setting]
    spec = BuildSpec(optimizer=raytp.AdamW(lr=1e-4, fused=True), seed=0, **options)
    engine = build_engine(raytp.DeviceMesh(tp=1), spec)
    ids = np.random.default_rng(0).integers(0, LLAMA_1B.vocab_size, (batch_size, LLAMA_1B.max_seq_len))
    return engine, {"input_ids": ids}


def phase_times(engine, batch, steps: int = 5) -> dict:
    out = collections.defaultdict(list)
    for _ in range(steps):
        marks = [torch.cuda.Event(enable_timing=True) for _ in range(4)]
        marks[0].record()
        engine.forward(batch)
        marks[1].record()
        engine.backward()
        marks[2].record()
        engine.step()
        marks[3].record()
        torch.cuda.synchronize()
        for name, a, b in (("forward", 0, 1), ("backward", 1, 2), ("step", 2, 3)):
            out[name].append(marks[a].elapsed_time(marks[b]))
    return {k: float(np.median(v)) for k, v in out.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--setting", default="bf16", help="a setting of raytp bench recipe")
    parser.add_argument("--batch-size", type=int, default=4, help="sequences of 2048 tokens per step")
    parser.add_argument("--out", default="out/profile", help="folder for the Chrome trace")
    parser.add_argument("--top", type=int, default=30, help="kernels listed")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    engine, batch = build(args.setting, args.batch_size)
    for _ in range(3):
        engine.train_step(batch)
    torch.cuda.synchronize()
    times = phase_times(engine, batch)
    print(f"setting {args.setting}: " + ", ".join(f"{k} {v:.1f} ms" for k, v in times.items()),
          f"total {sum(times.values()):.1f} ms")
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                            torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(2):
            engine.train_step(batch)
        torch.cuda.synchronize()
    prof.export_chrome_trace(os.path.join(args.out, f"trace-{args.setting}.json"))
    kernels = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
    total = sum(e.self_device_time_total for e in kernels) / 2  # two steps; microseconds
    by_kind = collections.Counter()
    for e in kernels:
        by_kind[kind_of(e.key)] += e.self_device_time_total / 2
    print(f"GPU kernel time per step: {total / 1e3:.1f} ms")
    for kind, t in by_kind.most_common():
        print(f"  {kind:18s} {t / 1e3:8.2f} ms  {t / total:6.1%}")
    print(f"\ntop {args.top} kernels (per step):")
    for e in sorted(kernels, key=lambda e: -e.self_device_time_total)[:args.top]:
        ms, calls = e.self_device_time_total / 2e3, e.count // 2
        print(f"  {ms:8.2f} ms  x{calls:<5d} {kind_of(e.key):12s} {e.key[:100]}")
    print("\nCPU ops by self CPU time (launch overhead):")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15, max_name_column_width=60))


if __name__ == "__main__":
    main()
