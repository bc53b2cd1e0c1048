"""Generation against transformers and through the driver: greedy ids of ragged prompts
(lengths 1 to 20 in one call) equal transformers' greedy ``generate`` of each prompt
alone for GPT-2 and Llama checkpoints made with ``save_pretrained``, at tp 1, 2 and 4
(the Llama has fewer key/value heads than 4 ranks, and 4 does not divide the
vocabulary); its end-of-sequence id as a stop id ends sequences as transformers' does.
Through ``TPCluster``: ``generate`` gives the same ids, ``stream`` yields exactly what
``generate`` returns, the stats and the build's cache sizes are reported, bad input is
refused on the driver before any rank work, and a training build generates between
steps without changing its losses."""

import os

import pytest
import torch

import raytp
from raytp.engine import BuildSpec, build_engine
from raytp.inference import SamplingParams, generate
from raytp.models import pretrained

import _dist
from helpers import mesh, world

transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")
os.environ["HF_HUB_OFFLINE"] = "1"

VOCAB = 50  # 4 ranks do not divide it
LENGTHS = [1, 20, 3, 11, 7, 2, 16, 5, 13, 9]
NEW = 10
EOS = 37  # what the random weights below choose now and then: some sequences stop early


def _configs():
    gpt2 = transformers.GPT2Config(vocab_size=VOCAB, n_positions=64, n_embd=32, n_layer=2, n_head=4,
                                   initializer_range=0.5, bos_token_id=0, eos_token_id=EOS)
    llama = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48,
                                     num_hidden_layers=2,
                                     num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=64,
                                     initializer_range=0.5, tie_word_embeddings=False, bos_token_id=0,
                                     eos_token_id=EOS)
    return {"gpt2": (gpt2, transformers.GPT2LMHeadModel), "llama": (llama, transformers.LlamaForCausalLM)}


def _prompts():
    g = torch.Generator().manual_seed(3)
    return [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in LENGTHS]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Each model saved, and transformers' greedy ids of every prompt alone, in float64."""
    root, out = tmp_path_factory.mktemp("gen"), {}
    for name, (config, cls) in _configs().items():
        torch.manual_seed(0)
        model = cls(config).eval()
        model.save_pretrained(root / name)
        model = model.double()
        expect = []
        for p in _prompts():
            ids = model.generate(torch.tensor([p]), max_new_tokens=NEW, do_sample=False,
                                 attention_mask=torch.ones(1, len(p), dtype=torch.long), pad_token_id=0)
            expect.append(ids[0, len(p):].tolist())
        out[name] = (str(root / name), expect)
    assert any(len(e) < NEW and e[-1] == EOS for _, es in out.values() for e in es), "no sequence stopped"
    return out


def _generate(path):
    rank, n = world()
    engine = build_engine(mesh(n), BuildSpec(pretrained(path, dtype="float64"), optimizer=None, max_batch=4))
    return generate(engine.generation, _prompts(), SamplingParams(NEW, stop_token_ids=(EOS,)))


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_greedy_ids_equal_transformers_generate(checkpoints, name):
    path, expect = checkpoints[name]
    for n in (1, 2, 4):
        for out in _dist.run(n, _generate, path):
            assert out == expect, n


def test_cluster_generate_and_stream(ray_local, checkpoints):
    path, expect = checkpoints["llama"]
    prompts, sampling = _prompts(), SamplingParams(NEW, stop_token_ids=(EOS,))
    with raytp.TPCluster(tp=2, device="cpu") as cluster:
        info = cluster.build(pretrained(path, dtype="float64"), optimizer=None, max_batch=4, max_len=40)
        assert info["generation"]["max_batch"] == 4 and info["generation"]["max_len"] == 40
        assert info["generation"]["kv_cache_bytes"] > 0
        assert cluster.generate(prompts, sampling) == expect
        stats = cluster.generation_stats()
        assert stats["tokens"] == sum(map(len, expect)) and stats["decode_steps"] > 0
        assert 1 <= stats["mean_active_slots"] <= 4 and not stats["cuda_graphs"]
        assert all(t is not None and t > 0 for t in stats["first_token_s"])

        events = list(cluster.stream(prompts, sampling))
        streamed = [[t for i, t in events if i == k] for k in range(len(prompts))]
        assert streamed == expect and len(events) == sum(map(len, expect))

        seeded = SamplingParams(NEW, temperature=1.0, top_k=20, top_p=0.9, seed=5)
        first = cluster.generate(prompts, seeded)
        assert cluster.generate(prompts, seeded) == first and first != expect

        for bad, match in [([[1], []], "prompt 1 is empty"), ([[1, VOCAB]], f"holds id {VOCAB}, outside"),
                           ([[1] * 35], "beyond the KV cache's max_len=40")]:
            with pytest.raises(ValueError, match=match):
                cluster.generate(bad, sampling)
        with pytest.raises(ValueError, match="max_new_tokens"):
            cluster.generate(prompts, SamplingParams(0))
        assert cluster.generate(prompts[:2], sampling) == expect[:2]  # the ranks never saw the bad calls


def test_a_training_build_generates_between_steps(ray_local):
    config = raytp.models.GPTConfig(vocab_size=VOCAB, n_layers=2, n_heads=4, n_kv_heads=2, d_model=32,
                                    d_ff=64,
                                    max_seq_len=32, norm="rmsnorm", activation="swiglu", positions="rope",
                                    bias=False, tie_embeddings=False, dropout=0.1, dtype="float64")
    g = torch.Generator().manual_seed(1)
    batches = [{"input_ids": torch.randint(0, VOCAB, (4, 16), generator=g)} for _ in range(3)]
    losses = {}
    with raytp.TPCluster(tp=2, device="cpu") as cluster:
        for between in (False, True):
            cluster.build(config, optimizer=raytp.AdamW(lr=1e-2), seed=0)
            losses[between] = []
            for batch in batches:
                losses[between].append(cluster.train_step(batch)["loss"])
                if between:
                    out = cluster.generate([[1, 2, 3], [4]], SamplingParams(4, temperature=1.0, seed=0))
                    assert [len(o) for o in out] == [4, 4]
    assert losses[True] == losses[False]
