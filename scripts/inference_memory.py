"""Per-rank memory of an inference-only build against a training build of the same model.

    python scripts/inference_memory.py --device cuda --json out/memory.json

Builds a Llama-style GPT through ``TPCluster`` twice, once with AdamW and once with
``optimizer=None``, runs one step (training) or one evaluation (inference), and prints
each rank's ``memory_bytes()``: parameters, gradients, optimizer state and, on CUDA,
everything the caching allocator handed out.
"""

import argparse
import json

import numpy as np

import raytp
from raytp.models import GPTConfig


def config(device: str) -> GPTConfig:
    big = device == "cuda"
    return GPTConfig(vocab_size=32000, n_layers=8 if big else 2, n_heads=16, n_kv_heads=4,
                     d_model=2048 if big else 256, d_ff=5632 if big else 704, max_seq_len=512,
                     norm="rmsnorm", activation="swiglu", positions="rope", tie_embeddings=False,
                     bias=False, dtype="bfloat16" if big else "float32")


def measure(tp: int, device: str) -> dict:
    cfg = config(device)
    batch = {"input_ids": np.random.default_rng(0).integers(0, cfg.vocab_size, (4, cfg.max_seq_len))}
    shown = ("n_layers", "d_model", "dtype")
    out = {"device": device, "tp": tp, "config": {k: getattr(cfg, k) for k in shown}}
    with raytp.TPCluster(tp=tp, device=device) as cluster:
        cluster.build(cfg, optimizer=raytp.AdamW(), seed=0)
        cluster.train_step(batch)
        out["training"] = cluster.run("memory_bytes")
        cluster.build(cfg, optimizer=None, seed=0)
        cluster.evaluate(batch)
        out["inference"] = cluster.run("memory_bytes")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="where the ranks run")
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel size")
    parser.add_argument("--json", help="write the result here too")
    args = parser.parse_args()
    result = measure(args.tp, args.device)
    print(f"{args.device}, tp={args.tp}:")
    print("| build | rank | params MiB | grads MiB | optimizer MiB | allocated MiB |")
    print("|---|---|---|---|---|---|")
    for kind in ("training", "inference"):
        for rank, m in enumerate(result[kind]):
            cells = [m.get(k, 0) / 2**20 for k in ("param_bytes", "grad_bytes", "optimizer_bytes",
                                                     "allocated_bytes")]
            print(f"| {kind} | {rank} | " + " | ".join(f"{c:,.1f}" for c in cells) + " |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
