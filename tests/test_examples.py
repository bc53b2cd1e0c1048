"""The examples run and do what they say."""

import importlib.util
from pathlib import Path

ROOT = Path(__file__).parents[1]


def _load(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_train_gpt_learns_below_the_unigram_entropy(tmp_path, monkeypatch):
    """A byte-level GPT at tp=2 on CPU ranks: after 120 short steps the held-out loss is
    well below the entropy of the byte distribution, and it writes its plot and a sample."""
    monkeypatch.setenv("RAY_ADDRESS", "")
    train_gpt = _load("train_gpt")
    png = tmp_path / "loss.png"
    result = train_gpt.main(tp=2, steps=120, d_model=64, n_layers=2, seq=64, batch=16, device="cpu",
                            png=str(png), progress=False)
    assert result["eval_loss"] < result["entropy"] - 0.4, result
    assert png.stat().st_size > 10_000 and len(result["sample"]) > 20
