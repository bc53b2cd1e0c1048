"""A byte-level GPT trained through TPCluster on real text available offline: the
Python standard library's own source files, read from this interpreter's install.

    python examples/train_gpt.py                      # tp=2 on CPU ranks, ~300 steps
    python examples/train_gpt.py --tp 2 --device cuda --steps 2000 --d-model 512

It shows a progress bar with the loss, tokens/s and a periodic held-out loss, writes
a loss-curve PNG, compares the final held-out loss with the unigram entropy of the
bytes (what a model that ignores context would reach), and generates a sample with
the KV cache at the end.
"""

from __future__ import annotations

import argparse
import math
import sysconfig
from pathlib import Path

import numpy as np

import raytp
from raytp.models import GPTConfig


def stdlib_bytes(limit: int = 4_000_000) -> np.ndarray:
    """Up to ``limit`` bytes of the standard library's .py files, in a fixed order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    chunks, total = [], 0
    for path in sorted(root.glob("*.py")) + sorted(root.glob("*/*.py")):
        data = path.read_bytes()
        chunks.append(data)
        total += len(data)
        if total >= limit:
            break
    return np.frombuffer(b"\n".join(chunks)[:limit], dtype=np.uint8)


def unigram_entropy(data: np.ndarray) -> float:
    """Entropy of the byte distribution, in nats (the loss of the best context-free model)."""
    p = np.bincount(data, minlength=256) / len(data)
    p = p[p > 0]
    return float(-(p * np.log(p)).sum())


def windows(data: np.ndarray, batch: int, seq: int, rng: np.random.Generator):
    """Endless batches of random (batch, seq) windows as int64 token ids."""
    while True:
        starts = rng.integers(0, len(data) - seq, batch)
        yield {"input_ids": np.stack([data[s:s + seq] for s in starts]).astype(np.int64)}


def generate(actor, prompt: np.ndarray, new_tokens: int, seed: int = 0) -> list[int]:
    """On a rank: sampling (temperature 0.8, top 20 bytes) with the KV cache; every rank
    returns the same ids (TP rank 0's draws are broadcast)."""
    import torch

    model = actor.engine.model
    ids = torch.tensor(prompt, device=actor.mesh.device).unsqueeze(0)  # a copy: Ray arrays are read-only
    generator = torch.Generator(device=actor.mesh.device).manual_seed(seed)
    return model.generate(ids, new_tokens, temperature=0.8, top_k=20, generator=generator)[0].tolist()


def plot(history: list[dict], entropy: float, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([h["step"] for h in history], [h["loss"] for h in history], lw=0.8, label="train")
    evals = [h for h in history if "eval_loss" in h]
    ax.plot([h["step"] for h in evals], [h["eval_loss"] for h in evals], "o-", label="held out")
    ax.axhline(entropy, color="gray", ls="--", label=f"unigram entropy {entropy:.2f}")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats / byte)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(tp: int = 2, steps: int = 300, d_model: int = 128, n_layers: int = 4, seq: int = 128,
         batch: int = 16, device: str = "auto", png: str = "train_gpt_loss.png",
         progress: bool = True) -> dict:
    data = stdlib_bytes()
    split = int(0.9 * len(data))
    train, held_out = data[:split], data[split:]
    entropy = unigram_entropy(train)
    eval_batch = next(windows(held_out, 64, seq, np.random.default_rng(1)))
    with raytp.TPCluster(tp=tp, device=device) as cluster:
        # bf16 on GPUs (device="auto" included), fp32 on CPU ranks
        config = GPTConfig(vocab_size=256, n_layers=n_layers, n_heads=4, d_model=d_model, max_seq_len=seq,
                           norm="rmsnorm", activation="swiglu", positions="rope", bias=False,
                           tie_embeddings=True, dtype="bfloat16" if cluster.device == "cuda" else "float32")
        info = cluster.build(config, optimizer=raytp.AdamW(lr=3e-3, weight_decay=0.1), max_grad_norm=1.0)
        print(f"{cluster}: GPT with {info['params']:,} parameters on {len(data):,} bytes of stdlib source")
        history = cluster.fit(windows(train, batch, seq, np.random.default_rng(0)), steps=steps,
                              eval_batch=eval_batch, eval_every=max(1, steps // 10), progress=progress)
        final = cluster.evaluate(eval_batch)["loss"]
        prompt = np.frombuffer(b"def __init__(self", dtype=np.uint8).astype(np.int64)
        sample = bytes(cluster.run(generate, prompt, seq - len(prompt))[0]).decode("utf-8", errors="replace")
    tokens_per_s = np.median([h["tokens_per_s"] for h in history[len(history) // 2:]])
    print(f"unigram entropy of the bytes: {entropy:.3f} nats; held-out loss after {steps} steps: "
          f"{final:.3f} nats ({final / math.log(2):.2f} bits/byte); {tokens_per_s:,.0f} tokens/s")
    print(f"sample:\n{sample}")
    if png:
        plot(history, entropy, png)
        print(f"loss curve: {png}")
    return {"entropy": entropy, "eval_loss": final, "sample": sample, "tokens_per_s": tokens_per_s}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tp", type=int, default=2)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--d-model", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--png", default="train_gpt_loss.png")
    a = parser.parse_args()
    main(a.tp, a.steps, a.d_model, a.layers, a.seq, a.batch, a.device, a.png)
