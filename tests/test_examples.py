"""The examples run and do what they say."""

import importlib.util
from pathlib import Path

ROOT = Path(__file__).parents[1]


def _load(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_train_gpt_recipe_resumes_with_the_same_losses(ray_local, tmp_path, monkeypatch):
    """--recipe (BPE tokens, warmup-cosine, two micro-batches, checkpoints, TensorBoard) at
    tp=2 on CPU ranks: a run stopped after 12 of 24 steps and resumed from its checkpoint
    takes steps 12..23 exactly as the uninterrupted run does."""
    monkeypatch.setenv("RAY_ADDRESS", "")
    train_gpt = _load("train_gpt")
    small = {"tp": 2, "steps": 24, "d_model": 32, "n_layers": 2, "seq": 32, "batch": 8, "device": "cpu",
             "progress": False, "recipe": True, "vocab": 384, "ckpt_every": 12}
    whole = train_gpt.main(**small, png=str(tmp_path / "whole.png"), ckpt=str(tmp_path / "a"),
                           log_dir=str(tmp_path / "tb"))
    first = train_gpt.main(**small, png="", ckpt=str(tmp_path / "b"), stop_after=12)
    rest = train_gpt.main(**small, png="", ckpt=str(tmp_path / "b"), resume=True)
    assert [h["step"] for h in whole["history"]] == list(range(24))
    assert len(first["history"]) == 12 and rest["resumed_at"] == 12
    assert [h["step"] for h in rest["history"]] == list(range(12, 24))
    for key in ("loss", "lr"):
        assert [h[key] for h in rest["history"]] == [h[key] for h in whole["history"][12:]], key
    lrs = [h["lr"] for h in whole["history"]]
    assert lrs[0] < lrs[1] and lrs[-1] < max(lrs)  # warmup, then decay
    assert (tmp_path / "whole.png").stat().st_size > 10_000 and any((tmp_path / "tb").iterdir())


def test_train_gpt_learns_below_the_unigram_entropy(ray_local, tmp_path, monkeypatch):
    """A byte-level GPT at tp=2 on CPU ranks: after 120 short steps the held-out loss is
    well below the entropy of the byte distribution, and it writes its plot and a sample."""
    monkeypatch.setenv("RAY_ADDRESS", "")
    train_gpt = _load("train_gpt")
    png = tmp_path / "loss.png"
    result = train_gpt.main(tp=2, steps=120, d_model=64, n_layers=2, seq=64, batch=16, device="cpu",
                            png=str(png), progress=False)
    assert result["eval_loss"] < result["entropy"] - 0.4, result
    assert png.stat().st_size > 10_000 and len(result["sample"]) > 20


def test_every_example_option_has_help_and_shows_its_default():
    """Each examples/*.py parser prints its defaults (ArgumentDefaultsHelpFormatter) and
    every option says what it is; ray_job.py --help shows them."""
    import ast
    import subprocess
    import sys

    parsers = 0
    for path in sorted((ROOT / "examples").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute):
                continue
            keywords = {k.arg for k in node.keywords}
            if node.func.attr == "ArgumentParser":
                parsers += 1
                assert {"description", "formatter_class"} <= keywords, f"{path.name}:{node.lineno}"
            if node.func.attr == "add_argument":
                assert "help" in keywords, f"{path.name}:{node.lineno} {ast.unparse(node.args[0])}"
    assert parsers >= 5
    out = subprocess.run([sys.executable, str(ROOT / "examples" / "ray_job.py"), "--help"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "tensor-parallel ranks (GPUs, or CPU ranks) (default: 2)" in " ".join(out.stdout.split())
