"""Sharded checkpoints of training state: saved at tp=2, training goes on identically at
tp=1, 2 and 4 (float64; the padded vocabulary and key/value heads shared by ranks
resharded); RNG states restored; DP ranks other than 0 write nothing; a crash during a
save leaves the last checkpoint intact; corrupt or truncated files are named; export
to a Hugging Face directory that transformers loads with the same logits."""

import json
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import raytp
from raytp.checkpoint import CheckpointError
from raytp.engine import RankEngine
from raytp.models import GPTConfig

import _dist
from helpers import mesh, world

SMALL = {"vocab_size": 37, "n_layers": 2, "d_model": 32, "d_ff": 48, "max_seq_len": 16, "dtype": "float64"}
LLAMA = {"norm": "rmsnorm", "activation": "swiglu", "positions": "rope", "bias": False,
         "tie_embeddings": False, "n_heads": 8, "n_kv_heads": 2}
CONFIGS = {"gpt2": GPTConfig(**SMALL, n_heads=4), "llama-gqa": GPTConfig(**SMALL, **LLAMA)}
N_BEFORE, K_AFTER = 3, 3
PARITY = {"rtol": 1e-9, "atol": 1e-11}  # float64: rounding only


def _batch(step, rows=4):
    return {"input_ids": torch.randint(0, 37, (rows, 8), generator=torch.Generator().manual_seed(step))}


def _engine(config, m, seed):
    torch.manual_seed(seed)
    model = config.build(m)
    return RankEngine(m, model, raytp.AdamW(lr=1e-2, weight_decay=0.1).build(model),
                      max_grad_norm=1.0)


def _losses(engine, steps):
    return [engine.train_step(_batch(engine.step_count))["loss"] for _ in steps]


def _train_save_continue(config, path):
    rank, n = world()
    engine = _engine(config, mesh(n), seed=0)
    _losses(engine, range(N_BEFORE))
    raytp.checkpoint.save(path, engine.model, engine.optimizer, engine.mesh, step=engine.step_count,
                          data_position=N_BEFORE, extra={"epoch": 1})
    return _losses(engine, range(K_AFTER))


def _load_continue(config, path):
    rank, n = world()
    engine = _engine(config, mesh(n), seed=1)  # other weights: the checkpoint must replace them all
    state = engine.load_checkpoint(path)
    assert state == {"step": N_BEFORE, "data_position": N_BEFORE, "extra": {"epoch": 1}}
    return _losses(engine, range(K_AFTER))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Per config: the checkpoint saved at tp=2 after N steps, and the next K losses."""
    out = {}
    for name, config in CONFIGS.items():
        path = tmp_path_factory.mktemp("ckpt") / name
        out[name] = (path, _dist.run(2, _train_save_continue, config, str(path))[0])
    return out


@pytest.mark.parametrize("n", [1, 2, 4])
@pytest.mark.parametrize("name", CONFIGS)
def test_resharded_training_goes_on_with_the_same_losses(saved, name, n):
    path, expected = saved[name]
    index = json.loads((path / "checkpoint.json").read_text())
    assert index["tp"] == 2 and sorted(index["files"]) == ["rank-00000-of-00002.safetensors",
                                                           "rank-00001-of-00002.safetensors"]
    assert index["params"]["embed.weight"]["global_shape"] == [38, 32]  # 37 padded for tp=2
    for losses in _dist.run(n, _load_continue, CONFIGS[name], str(path)):
        torch.testing.assert_close(torch.tensor(losses), torch.tensor(expected), **PARITY)


def _rng_round_trip(path):
    """With dropout, continuing after a load draws the same masks as continuing after the save."""
    rank, n = world()
    config = GPTConfig(**SMALL, n_heads=4, dropout=0.2)
    engine = _engine(config, mesh(n), seed=0)
    _losses(engine, range(2))
    raytp.checkpoint.save(path, engine.model, engine.optimizer, engine.mesh, step=engine.step_count)
    after_save = _losses(engine, range(2)) + [torch.rand(3)]
    engine = _engine(config, mesh(n), seed=5)
    engine.load_checkpoint(path)
    after_load = _losses(engine, range(2)) + [torch.rand(3)]
    return after_save, after_load


def test_rng_states_are_restored(tmp_path):
    for after_save, after_load in _dist.run(2, _rng_round_trip, str(tmp_path / "ckpt")):
        assert after_save[:2] == after_load[:2]  # bit for bit
        torch.testing.assert_close(after_save[2], after_load[2], rtol=0, atol=0)


def _dp_save_load(path):
    rank, n = world()
    m = mesh(2, 2)
    engine = _engine(CONFIGS["llama-gqa"], m, seed=0)
    for step in range(2):  # each DP group trains on its half of the batch
        engine.train_step({"input_ids": _batch(step)["input_ids"].chunk(2)[m.dp_rank]})
    raytp.checkpoint.save(path, engine.model, engine.optimizer, m, step=engine.step_count)
    params = {k: p.detach().clone() for k, p in engine.model.named_parameters()}
    moments = [s["exp_avg_sq"].clone() for s in engine.optimizer.state.values()]
    engine = _engine(CONFIGS["llama-gqa"], m, seed=1)
    engine.load_checkpoint(path)
    for k, p in engine.model.named_parameters():
        torch.testing.assert_close(p.detach(), params[k], rtol=0, atol=0)
    for before, after in zip(moments, engine.optimizer.state.values(), strict=True):
        torch.testing.assert_close(after["exp_avg_sq"], before, rtol=0, atol=0)
    return m.dp_rank


def test_only_dp_rank_0_writes_and_every_rank_loads(tmp_path):
    path = tmp_path / "ckpt"
    assert _dist.run(4, _dp_save_load, str(path)) == [0, 0, 1, 1]
    index = json.loads((path / "checkpoint.json").read_text())
    assert (index["tp"], index["dp"]) == (2, 2)
    assert sorted(p.name for p in path.iterdir()) == [
        "checkpoint.json", "rank-00000-of-00002.safetensors", "rank-00001-of-00002.safetensors"]


def _crash_then_corrupt(path):
    rank, n = world()
    engine = _engine(CONFIGS["gpt2"], mesh(n), seed=0)
    _losses(engine, range(1))
    raytp.checkpoint.save(path, engine.model, engine.optimizer, engine.mesh, step=engine.step_count)
    _losses(engine, range(1))
    import raytp.checkpoint.training as training

    def crash(*args, **kwargs):
        raise OSError("disk full (simulated)")

    original, training.write_index = training.write_index, crash
    try:
        with pytest.raises(OSError, match="simulated"):
            raytp.checkpoint.save(path, engine.model, engine.optimizer, engine.mesh, step=engine.step_count)
    finally:
        training.write_index = original
    assert engine.load_checkpoint(path)["step"] == 1  # the last good checkpoint, intact
    assert [p.name.split("-")[0] for p in Path(path).parent.iterdir() if ".tmp-" in p.name] == ["ckpt.tmp"]
    shard = Path(path) / "rank-00000-of-00001.safetensors"
    data = bytearray(shard.read_bytes())
    data[-5] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"rank-00000-of-00001\.safetensors is corrupt"):
        engine.load_checkpoint(path)
    shard.write_bytes(bytes(data[:-100]))
    with pytest.raises(CheckpointError, match=r"rank-00000-of-00001\.safetensors has \d+ bytes; the index "
                                              r"records \d+ \(truncated"):
        engine.load_checkpoint(path)
    other = _engine(GPTConfig(**{**SMALL, "d_ff": 64}, n_heads=4), mesh(n), seed=0)
    with pytest.raises(CheckpointError, match="d_ff: saved 48, model 64"):
        other.load_checkpoint(path)


def test_a_crash_during_save_keeps_the_last_checkpoint_and_corruption_is_named(tmp_path):
    _dist.run(1, _crash_then_corrupt, str(tmp_path / "ckpt"))


def _export(config, directory, ids):
    rank, n = world()
    engine = _engine(config, mesh(n), seed=0)
    _losses(engine, range(2))
    engine.export_hf(directory)
    with torch.no_grad():
        local = engine.model.eval()(ids)
    return _gathered_logits(local, n, config.vocab_size)


def _gathered_logits(local, n, vocab_size):
    parts = [torch.empty_like(local) for _ in range(n)]
    dist.all_gather(parts, local)
    return torch.cat(parts, -1)[..., :vocab_size]


def _reload(directory, ids, vocab_size):
    """raytp's own from_pretrained reads the export back, at this world's tp."""
    rank, n = world()
    model = raytp.models.from_pretrained(directory, mesh(n)).eval()
    with torch.no_grad():
        return _gathered_logits(model(ids), n, vocab_size)


@pytest.mark.parametrize(("name", "n", "cls"), [("gpt2", 2, "GPT2LMHeadModel"),
                                                ("llama-gqa", 4, "LlamaForCausalLM")])
def test_export_hf_loads_in_transformers_with_the_same_logits(tmp_path, name, n, cls):
    transformers = pytest.importorskip("transformers")
    config = GPTConfig(**{**SMALL, "dtype": "float32"}, **({"n_heads": 4} if name == "gpt2" else LLAMA))
    ids = _batch(9)["input_ids"]
    logits = _dist.run(n, _export, config, str(tmp_path / "hf"), ids)[0]
    model = getattr(transformers, cls).from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        expected = model(ids).logits
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["architectures"] == [cls]
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)
    # and raytp reads its own export back, at another tp
    reloaded = _dist.run(2 if n == 4 else 1, _reload, str(tmp_path / "hf"), ids, config.vocab_size)[0]
    torch.testing.assert_close(reloaded, logits, rtol=1e-5, atol=1e-5)


def test_export_needs_a_config_that_gpt2_or_llama_computes():
    from raytp.models.hf_config import export_family

    assert export_family(CONFIGS["gpt2"]) == "gpt2" and export_family(CONFIGS["llama-gqa"]) == "llama"
    with pytest.raises(ValueError, match=r"norm='rmsnorm', activation='gelu'.* is neither GPT-2"):
        export_family(GPTConfig(**SMALL, n_heads=4, norm="rmsnorm"))
