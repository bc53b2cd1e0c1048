"""``raytp demo``: a TP MLP classifier on scikit-learn's handwritten digits, through
a ``TPCluster`` (tp=2, on GPUs when the cluster has them, else CPU ranks)."""

from __future__ import annotations

import numpy as np
from torch import nn

import raytp

PLAN = {"fc_in": "colwise", "fc_out": "rowwise", "head": "colwise_gather"}


class DigitsMLP(nn.Module):
    """8x8 digit images (64 pixels) -> 10 classes; fc_in/fc_out become one TP MLP."""

    def __init__(self, hidden: int = 512):
        super().__init__()
        self.fc_in = nn.Linear(64, hidden)
        self.fc_out = nn.Linear(hidden, 128)
        self.head = nn.Linear(128, 10)

    def forward(self, x):
        h = nn.functional.gelu(self.fc_in(x))
        return self.head(nn.functional.gelu(self.fc_out(h)))


def load_digits(seed: int = 0):
    """Standardized features and labels, split 80/20 into train and held-out sets."""
    try:
        from sklearn.datasets import load_digits as sk_load_digits
    except ImportError as e:
        raise SystemExit("the demo needs scikit-learn: pip install 'raytp[demo]'") from e
    data = sk_load_digits()
    x = (data.data / 16.0).astype(np.float32)
    x = (x - x.mean(0)) / (x.std(0) + 1e-6)
    y = data.target.astype(np.int64)
    order = np.random.default_rng(seed).permutation(len(x))
    cut = int(0.8 * len(x))
    train, test = order[:cut], order[cut:]
    return {"x": x[train], "y": y[train]}, {"x": x[test], "y": y[test]}


def batches(train: dict, batch_size: int, epochs: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    n = len(train["y"])
    for _ in range(epochs):
        order = rng.permutation(n)
        for start in range(0, n - batch_size + 1, batch_size):
            idx = order[start:start + batch_size]
            yield {"x": train["x"][idx], "y": train["y"][idx]}


def main(tp: int = 2, epochs: int = 15, batch_size: int = 128, device: str = "auto",
         progress: bool = True) -> float:
    train, test = load_digits()
    steps = epochs * (len(train["y"]) // batch_size)
    with raytp.TPCluster(tp=tp, device=device) as cluster:
        print(f"{cluster}: {cluster.world_size} ranks")
        info = cluster.build(DigitsMLP, plan=PLAN, optimizer=raytp.AdamW(lr=2e-3), seed=0)
        print(f"model: {info['params']:,} parameters; per rank {info['param_bytes_per_rank']} bytes")
        history = cluster.fit(batches(train, batch_size, epochs), steps=steps, eval_batch=test,
                              eval_every=steps // epochs, progress=progress)
        for summary in history[:: max(1, len(history) // 10)] + history[-1:]:
            print(f"step {summary['step']:4d}  loss {summary['loss']:.4f}  "
                  f"train acc {summary['accuracy']:.3f}  {summary['samples_per_s']:9,.0f} samples/s"
                  f"  step {summary['step_s'] * 1e3:6.1f} ms  comm {summary['comm_bytes']:,} B")
        result = cluster.evaluate(test)
    print(f"held-out accuracy: {result['accuracy']:.4f} ({len(test['y'])} images)")
    return result["accuracy"]
