"""A byte-level GPT trained through TPCluster on real text available offline: the
Python standard library's own source files, read from this interpreter's install.

    python examples/train_gpt.py                      # tp=2 on CPU ranks, ~300 steps
    python examples/train_gpt.py --tp 2 --device cuda --steps 2000 --d-model 512

It shows a progress bar with the loss, tokens/s and a periodic held-out loss, writes
a loss-curve PNG, compares the final held-out loss with the unigram entropy of the
tokens (what a model that ignores context would reach), and generates a sample with
the KV cache at the end.

    python examples/train_gpt.py --recipe --steps 400 --log-dir runs/gpt --ckpt ckpt/gpt
    python examples/train_gpt.py --recipe --steps 800 --log-dir runs/gpt --ckpt ckpt/gpt --resume

``--recipe`` trains the way a real run does: a BPE tokenizer (trained here, offline,
with the ``tokenizers`` package, on the same text), mixed precision on GPUs (bf16
compute, fp32 master weights and AdamW states), warmup-cosine learning rates, two
micro-batches per step, no weight decay on norms and embeddings, a checkpoint every
``--ckpt-every`` steps, TensorBoard logs in ``--log-dir``, and ``--resume`` from the
last checkpoint (the data stream skips the batches already used).
"""

from __future__ import annotations

import argparse
import sysconfig
from pathlib import Path

import numpy as np

import raytp
from raytp.models import GPTConfig
from raytp.schedules import WarmupCosine


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
    """Entropy of the token distribution, in nats (the loss of the best context-free model)."""
    p = np.bincount(data) / len(data)
    p = p[p > 0]
    return float(-(p * np.log(p)).sum())


def bpe_tokens(data: np.ndarray, vocab_size: int):
    """A byte-level BPE tokenizer trained on ``data`` (offline, with ``tokenizers``), and
    ``data`` as its token ids."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    text = data.tobytes().decode("utf-8", errors="replace")
    lines = text.splitlines(keepends=True)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(lines, trainer=trainer)
    ids = [i for enc in tokenizer.encode_batch(lines) for i in enc.ids]
    return tokenizer, np.asarray(ids, dtype=np.int64)


def windows(data: np.ndarray, batch: int, seq: int, rng: np.random.Generator):
    """Endless batches of random (batch, seq) windows as int64 token ids (the same stream
    each run: a resumed ``fit`` skips the batches its checkpoint covers)."""
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


def recipe_options(device: str, steps: int) -> dict:
    """The build options of ``--recipe``: mixed precision on GPUs, warmup-cosine, two
    micro-batches, clipping; AdamW without decay on norms, biases and embeddings."""
    schedule = WarmupCosine(warmup_steps=max(1, steps // 20), total_steps=steps, min_lr_ratio=0.1)
    options = {"optimizer": raytp.AdamW(lr=3e-3, weight_decay=0.1, no_decay="default"), "max_grad_norm": 1.0,
               "lr_schedule": schedule, "micro_batches": 2}
    if device == "cuda":
        options["precision"] = raytp.MixedPrecision(param_dtype="bfloat16", master_dtype="float32")
    return options


def main(tp: int = 2, steps: int = 300, d_model: int = 128, n_layers: int = 4, seq: int = 128,
         batch: int = 16, device: str = "auto", png: str = "train_gpt_loss.png",
         progress: bool = True, recipe: bool = False, vocab: int = 1024, log_dir: str | None = None,
         ckpt: str | None = None, ckpt_every: int = 100, resume: bool = False,
         stop_after: int | None = None) -> dict:
    data = stdlib_bytes()
    tokenizer, data = bpe_tokens(data, vocab) if recipe else (None, data)
    vocab_size = tokenizer.get_vocab_size() if tokenizer is not None else 256
    split = int(0.9 * len(data))
    train, held_out = data[:split], data[split:]
    entropy = unigram_entropy(train)
    eval_batch = next(windows(held_out, 64, seq, np.random.default_rng(1)))
    policy = {"checkpoint_dir": ckpt, "checkpoint_every": ckpt_every} if ckpt else {}
    with raytp.TPCluster(tp=tp, device=device, **policy) as cluster:
        # bf16 on GPUs (device="auto" included), fp32 on CPU ranks; under --recipe, fp32 masters
        compute = "bfloat16" if cluster.device == "cuda" and not recipe else "float32"
        config = GPTConfig(vocab_size=vocab_size, n_layers=n_layers, n_heads=4, d_model=d_model,
                           max_seq_len=seq, norm="rmsnorm", activation="swiglu", positions="rope", bias=False,
                           tie_embeddings=True, dtype=compute)
        options = (recipe_options(cluster.device, steps) if recipe
                   else {"optimizer": raytp.AdamW(lr=3e-3, weight_decay=0.1), "max_grad_norm": 1.0})
        info = cluster.build(config, **options)
        done = cluster.resume()["data_position"] if resume else 0  # fit() then skips those batches
        if done:
            print(f"resumed from {cluster.recovery.latest()} after {done} steps")
        print(f"{cluster}: GPT with {info['params']:,} parameters on {len(data):,} tokens of stdlib source")
        history = cluster.fit(windows(train, batch, seq, np.random.default_rng(0)),
                              steps=min(steps, stop_after or steps), eval_batch=eval_batch,
                              eval_every=max(1, steps // 10), progress=progress, log_dir=log_dir)
        final = cluster.evaluate(eval_batch)["loss"]
        prompt = (np.asarray(tokenizer.encode("def __init__(self").ids) if tokenizer is not None else
                  np.frombuffer(b"def __init__(self", dtype=np.uint8).astype(np.int64))
        ids = cluster.run(generate, prompt, seq - len(prompt))[0]
    sample = (tokenizer.decode(ids) if tokenizer is not None
              else bytes(ids).decode("utf-8", errors="replace"))
    tokens_per_s = np.median([h["tokens_per_s"] for h in history[len(history) // 2:]]) if history else 0.0
    print(f"unigram entropy of the tokens: {entropy:.3f} nats; held-out loss after {steps} steps: "
          f"{final:.3f} nats; {tokens_per_s:,.0f} tokens/s")
    print(f"sample:\n{sample}")
    if png and history:
        plot(history, entropy, png)
        print(f"loss curve: {png}")
    return {"entropy": entropy, "eval_loss": final, "sample": sample, "tokens_per_s": tokens_per_s,
            "history": history, "resumed_at": done}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--tp", type=int, default=2, help="tensor-parallel ranks")
    parser.add_argument("--steps", type=int, default=300,
                        help="optimizer steps in all (a resumed run included)")
    parser.add_argument("--d-model", type=int, default=128, help="model width")
    parser.add_argument("--layers", type=int, default=4, help="transformer blocks")
    parser.add_argument("--seq", type=int, default=128, help="tokens per sequence")
    parser.add_argument("--batch", type=int, default=16, help="sequences per step")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                        help="where the ranks run")
    parser.add_argument("--png", default="train_gpt_loss.png", help="the loss curve")
    parser.add_argument("--recipe", action="store_true",
                        help="BPE tokens, mixed precision, schedule, accumulation")
    parser.add_argument("--vocab", type=int, default=1024, help="BPE vocabulary size (--recipe)")
    parser.add_argument("--log-dir", default=None, help="TensorBoard event files go here")
    parser.add_argument("--ckpt", default=None, help="checkpoint directory (a checkpoint every --ckpt-every)")
    parser.add_argument("--ckpt-every", type=int, default=100, help="steps between checkpoints")
    parser.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --ckpt")
    parser.add_argument("--stop-after", type=int, default=None,
                        help="stop after this many of --steps (the schedule still spans --steps)")
    a = parser.parse_args()
    main(a.tp, a.steps, a.d_model, a.layers, a.seq, a.batch, a.device, a.png, recipe=a.recipe, vocab=a.vocab,
         log_dir=a.log_dir, ckpt=a.ckpt, ckpt_every=a.ckpt_every, resume=a.resume, stop_after=a.stop_after)
