"""Greedy generation with the KV cache from a Llama checkpoint, on tensor-parallel CPU
ranks through TPCluster, checked against transformers' own greedy ``generate``.

    python examples/llama_generate.py                       # a tiny random Llama, tp 1 and 2
    python examples/llama_generate.py --path DIR --tp 1 2 4 # a Llama checkpoint directory

Without ``--path``, a small random Llama (grouped-query attention, 8 query heads and 2
key/value heads) is made with transformers and saved as safetensors to a temporary
directory: nothing is downloaded. Every tp gives the same tokens.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

import numpy as np

import raytp


def make_tiny_llama(directory: str | Path, seed: int = 0) -> Path:
    """A random Llama saved with ``save_pretrained`` (safetensors) into ``directory``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=64,
                         initializer_range=0.2, tie_word_embeddings=False, bos_token_id=None,
                         eos_token_id=None, pad_token_id=None)
    LlamaForCausalLM(config).save_pretrained(directory)
    return Path(directory)


def generate_on_rank(actor, prompt: np.ndarray, max_new_tokens: int) -> np.ndarray:
    """On a rank: (B, T + max_new_tokens) greedy ids, the same on every rank."""
    import torch

    ids = torch.tensor(prompt, device=actor.mesh.device)
    return actor.engine.model.generate(ids, max_new_tokens).cpu().numpy()


def generate(path: str | Path, prompt: np.ndarray, max_new_tokens: int, tp: int = 2,
             device: str = "cpu") -> np.ndarray:
    """Greedy continuation of ``prompt`` (B, T) by the checkpoint at ``path`` on ``tp`` ranks."""
    with raytp.TPCluster(tp=tp, device=device) as cluster:
        cluster.build(raytp.models.pretrained(path))
        return cluster.run(generate_on_rank, prompt, max_new_tokens)[0]


def transformers_generate(path: str | Path, prompt: np.ndarray, max_new_tokens: int) -> np.ndarray:
    import torch
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(path).eval()
    with torch.no_grad():
        out = model.generate(torch.from_numpy(prompt), max_new_tokens=max_new_tokens, do_sample=False,
                             min_new_tokens=max_new_tokens, pad_token_id=0)
    return out.numpy()


def run(path: str | Path | None, tps: list[int], max_new_tokens: int = 16) -> dict[str, np.ndarray]:
    """Tokens generated at each tp and by transformers (a tiny random Llama when ``path`` is None)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(path) if path else make_tiny_llama(Path(tmp) / "tiny-llama")
        prompt = np.random.default_rng(0).integers(0, 96, (2, 6)).astype(np.int64)
        results = {f"tp={tp}": generate(path, prompt, max_new_tokens, tp) for tp in tps}
        results["transformers"] = transformers_generate(path, prompt, max_new_tokens)
    return results


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--path", default=None,
                        help="a Llama checkpoint directory (default: a tiny random one)")
    parser.add_argument("--tp", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--new-tokens", type=int, default=16)
    args = parser.parse_args()
    outputs = run(args.path, args.tp, args.new_tokens)
    for name, ids in outputs.items():
        print(f"{name:>13}: {ids.tolist()}")
    reference = outputs["transformers"]
    same = all(np.array_equal(ids, reference) for ids in outputs.values())
    print("every tp gives transformers' tokens" if same else "MISMATCH")
    raise SystemExit(0 if same else 1)
