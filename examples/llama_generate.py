"""Greedy generation from a Llama checkpoint with ``cluster.generate`` and
``cluster.stream`` on tensor-parallel CPU ranks, checked against transformers' own
greedy ``generate``.

    python examples/llama_generate.py                       # a tiny random Llama, tp 1 and 2
    python examples/llama_generate.py --path DIR --tp 1 2 4 # a Llama checkpoint directory

Without ``--path``, a small random Llama (grouped-query attention, 8 query heads and 2
key/value heads) is made with transformers and saved as safetensors to a temporary
directory: nothing is downloaded. The prompts have different lengths; the cluster
decodes them together (continuous batching), and every tp gives transformers' tokens
for each prompt generated alone.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

import numpy as np

import raytp

VOCAB = 96


def make_tiny_llama(directory: str | Path, seed: int = 0) -> Path:
    """A random Llama saved with ``save_pretrained`` (safetensors) into ``directory``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=64,
                         initializer_range=0.2, tie_word_embeddings=False, bos_token_id=None,
                         eos_token_id=None, pad_token_id=None)
    LlamaForCausalLM(config).save_pretrained(directory)
    return Path(directory)


def prompts_of(lengths: list[int], seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, VOCAB, n).tolist() for n in lengths]


def generate(path: str | Path, prompts: list[list[int]], max_new_tokens: int, tp: int = 2,
             device: str = "cpu", show_stream: bool = False) -> dict[str, list[list[int]]]:
    """Each prompt's new ids from the checkpoint at ``path`` on ``tp`` ranks: through
    ``generate``, and through ``stream`` (printed as they come when ``show_stream``)."""
    sampling = raytp.SamplingParams(max_new_tokens=max_new_tokens)  # greedy: temperature 0
    with raytp.TPCluster(tp=tp, device=device) as cluster:
        # fewer cache slots than prompts: the last prompt takes the first slot that frees
        slots = max(1, len(prompts) - 1)
        info = cluster.build(raytp.models.pretrained(path), optimizer=None, max_batch=slots)
        generated = cluster.generate(prompts, sampling)
        streamed = [[] for _ in prompts]
        if show_stream:
            print(f"tp={tp}, KV cache {info['generation']}; streaming [prompt] token:")
        for index, token in cluster.stream(prompts, sampling):  # as each token is decided
            streamed[index].append(token)
            if show_stream:
                print(f"[{index}] {token}", end="  ", flush=True)
        if show_stream:
            print()
    return {"generate": generated, "stream": streamed}


def transformers_generate(path: str | Path, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    """transformers' greedy ``generate``, one prompt at a time (no padding)."""
    import torch
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(path).eval()
    out = []
    with torch.no_grad():
        for prompt in prompts:
            ids = model.generate(torch.tensor([prompt]), max_new_tokens=max_new_tokens, do_sample=False,
                                 min_new_tokens=max_new_tokens, pad_token_id=0)
            out.append(ids[0, len(prompt):].tolist())
    return out


def run(path: str | Path | None, tps: list[int], max_new_tokens: int = 16, lengths=(6, 3, 11),
        show_stream: bool = False) -> dict[str, list[list[int]]]:
    """New ids of each prompt: ``tp=N`` (generate), ``tp=N stream``, and ``transformers``
    (a tiny random Llama when ``path`` is None)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    prompts = prompts_of(list(lengths))
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(path) if path else make_tiny_llama(Path(tmp) / "tiny-llama")
        for i, tp in enumerate(tps):
            out = generate(path, prompts, max_new_tokens, tp, show_stream=show_stream and i == 0)
            results[f"tp={tp}"], results[f"tp={tp} stream"] = out["generate"], out["stream"]
        results["transformers"] = transformers_generate(path, prompts, max_new_tokens)
    return results


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--path", default=None,
                        help="a Llama checkpoint directory (None: a tiny random one)")
    parser.add_argument("--tp", type=int, nargs="+", default=[1, 2],
                        help="tensor-parallel sizes to generate at, one cluster each")
    parser.add_argument("--new-tokens", type=int, default=16, help="tokens generated per prompt")
    args = parser.parse_args()
    outputs = run(args.path, args.tp, args.new_tokens, show_stream=True)
    for name, ids in outputs.items():
        print(f"{name:>13}: {ids}")
    reference = outputs["transformers"]
    same = all(ids == reference for ids in outputs.values())
    print("every tp gives transformers' tokens" if same else "MISMATCH")
    raise SystemExit(0 if same else 1)
