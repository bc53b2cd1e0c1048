"""The whole GPT: tp=2 and tp=4 train exactly as tp=1 (float64, 10 AdamW steps, with
gradient clipping), with and without sequence parallelism, grouped-query attention with
fewer key/value heads than ranks, and tied embeddings; collective counts pinned per
block and per model; KV-cache decoding and generation; the config's validation."""

import functools
import pickle

import pytest
import torch

import raytp
from raytp.comm import count_collectives
from raytp.models import GPT, GPTConfig
from raytp.nn import padded_vocab

import _dist
from helpers import F64, assert_state_matches, chunk, mesh, randn, world

B, T, STEPS = 2, 8, 10
SMALL = {"vocab_size": 37, "n_layers": 2, "d_model": 32, "d_ff": 48, "max_seq_len": 16, "dtype": "float64"}
LLAMA = {"norm": "rmsnorm", "activation": "swiglu", "positions": "rope", "bias": False,
         "tie_embeddings": False, "n_heads": 8, "n_kv_heads": 2}  # at tp=4: 2 ranks per KV head
CONFIGS = {
    "gpt2": GPTConfig(**SMALL, n_heads=4),  # layernorm, gelu, learned positions, tied, biases
    "gpt2-sp": GPTConfig(**SMALL, n_heads=4, sequence_parallel=True),
    "llama-gqa": GPTConfig(**SMALL, **LLAMA),
    "llama-gqa-sp": GPTConfig(**SMALL, **LLAMA, sequence_parallel=True),
}
PARITY = {"rtol": 1e-9, "atol": 1e-11}  # float64 after 10 steps: rounding only


def _batch(step, vocab=37):
    ids = torch.randint(0, vocab, (B, T), generator=torch.Generator().manual_seed(100 + step))
    if step % 3 != 2:
        return {"input_ids": ids}
    labels = torch.roll(ids, -1, dims=1)
    labels[0, :3] = -100  # explicit labels, some ignored
    return {"input_ids": ids, "labels": labels}


def _state(model):
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def _train(config, ref):
    """STEPS steps of forward, backward, sync_grads, clip_grad_norm_ and AdamW. Returns the
    losses and grad norms, and at tp=1 the parameters before and after."""
    rank, n = world()
    m = mesh(n)
    torch.manual_seed(0)
    model = config.build(m)
    if ref is not None:
        assert_state_matches(model, ref["init"], m.tp_rank, rtol=0, atol=0)  # same weights at every tp
    init = _state(model) if n == 1 else None
    opt = raytp.AdamW(lr=1e-2, weight_decay=0.1).build(model.parameters())
    losses, norms = [], []
    for step in range(STEPS):
        loss = model.loss(_batch(step % 3))  # three batches, seen again and again
        loss.backward()
        raytp.sync_grads(model, m)
        norms.append(raytp.clip_grad_norm_(model.parameters(), 1.0, m).item())
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.detach())
    if ref is not None:
        assert_state_matches(model, ref["final"], m.tp_rank, **PARITY)
    return {"losses": torch.stack(losses), "norms": norms, "init": init,
            "final": _state(model) if n == 1 else None}


@functools.cache
def _reference(name):
    return _dist.run(1, _train, CONFIGS[name], None)[0]


@pytest.mark.parametrize("n", [2, 4])
@pytest.mark.parametrize("name", CONFIGS)
def test_training_matches_tp1(name, n):
    ref = _reference(name)
    results = _dist.run(n, _train, CONFIGS[name], ref)
    for r in results:
        torch.testing.assert_close(r["losses"], ref["losses"], **PARITY)
        assert r["norms"] == pytest.approx(ref["norms"], rel=1e-9)
    assert ref["losses"][9] < ref["losses"][0] - 0.1  # it learns: steps 0 and 9 see the same batch


def _counts(config):
    rank, n = world()
    m = mesh(n)
    torch.manual_seed(0)
    model = config.build(m)
    block = model.layers[0]
    x = randn(B, T, config.d_model, seed=1)
    x = (chunk(x, 1) if config.sequence_parallel else x).requires_grad_()
    rope = (model.rope_cos[:T], model.rope_sin[:T]) if config.positions == "rope" else None
    counts = {}
    with count_collectives() as c:
        y = block(x, rope)
    counts["block forward"] = c.by_kind()
    with count_collectives() as c:
        y.square().sum().backward()
    counts["block backward"] = c.by_kind()
    model.zero_grad(set_to_none=True)
    with count_collectives() as c:
        loss = model.loss(_batch(0))
    counts["model forward"] = c.by_kind()
    with count_collectives() as c:
        loss.backward()
    counts["model backward"] = c.by_kind()
    with count_collectives() as c:
        raytp.sync_grads(model, m)
    counts["sync_grads"] = c.by_kind()
    return counts


TP_BLOCK = {"all_reduce": 2}  # attention and MLP: one all-reduce each way
SP_BLOCK = {"all_gather": 2, "reduce_scatter": 2}  # each all-reduce split in two
L = SMALL["n_layers"]


@pytest.mark.parametrize("name", ["gpt2", "gpt2-sp", "llama-gqa", "llama-gqa-sp"])
def test_collective_counts(name):
    counts = _dist.run(4, _counts, CONFIGS[name])[0]
    assert counts["block forward"] == counts["block backward"] == (SP_BLOCK if "sp" in name else TP_BLOCK)
    if "sp" in name:  # the embedding's reduce-scatter and the LM head's all-gather besides
        expect_fwd = {"reduce_scatter": 2 * L + 1, "all_gather": 2 * L + 1, "all_reduce_max": 1,
                      "all_reduce": 1}
        expect_bwd = {"all_gather": 2 * L + 1, "reduce_scatter": 2 * L + 1}
    else:  # the embedding's all-reduce, the LM head's input-gradient all-reduce
        expect_fwd = {"all_reduce": 1 + 2 * L + 1, "all_reduce_max": 1}
        expect_bwd = {"all_reduce": 2 * L + 1}
    assert counts["model forward"] == expect_fwd
    assert counts["model backward"] == expect_bwd
    # partial gradients: none with plain TP and n_kv_heads >= tp; the norms, biases and
    # positions under SP, the KV heads shared by 2 ranks with GQA: one all-reduce for all
    assert counts["sync_grads"] == ({} if name == "gpt2" else {"all_reduce": 1})


def test_collective_counts_tp1():
    counts = _dist.run(1, _counts, CONFIGS["llama-gqa-sp"])[0]
    assert all(c == {} for c in counts.values())


def _check_kv_cache(config):
    """Prefill, then one token at a time: the logits of one full forward."""
    rank, n = world()
    torch.manual_seed(0)
    model = config.build(mesh(n)).eval()
    ids = _batch(0)["input_ids"]
    full = model(ids)
    cache = model.new_kv_cache()
    parts = [model(ids[:, :5], kv_cache=cache)] + [model(ids[:, t:t + 1], kv_cache=cache)
                                                   for t in range(5, T)]
    torch.testing.assert_close(torch.cat(parts, 1), full, **F64)
    assert full.shape == (B, T, padded_vocab(config.vocab_size, n) // n)


@pytest.mark.parametrize("n", [1, 2, 4])
@pytest.mark.parametrize("name", ["gpt2", "gpt2-sp", "llama-gqa-sp"])
def test_kv_cache_decoding_matches_full_forward(n, name):
    _dist.run(n, _check_kv_cache, CONFIGS[name])


def _check_loss(config):
    """loss() is F.cross_entropy of the gathered logits: next-token targets by default,
    the given labels (ignoring -100) otherwise."""
    rank, n = world()
    m = mesh(n)
    torch.manual_seed(0)
    model = config.build(m)
    for step in (0, 2):  # default labels; explicit ones with ignored positions
        batch = _batch(step)
        logits = torch.cat(_dist_gather(model(batch["input_ids"]), n), -1)[..., :config.vocab_size]
        labels = batch.get("labels", torch.nn.functional.pad(batch["input_ids"][:, 1:], (0, 1), value=-100))
        expect = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels)
        torch.testing.assert_close(model.loss(batch), expect, **F64)


def _dist_gather(x, n):
    out = [torch.empty_like(x) for _ in range(n)]
    torch.distributed.all_gather(out, x.detach().contiguous())
    return out


@pytest.mark.parametrize("n", [1, 2])
def test_loss_is_next_token_cross_entropy(n):
    _dist.run(n, _check_loss, CONFIGS["llama-gqa"])


def _generate(config, sample):
    rank, n = world()
    m = mesh(n)
    torch.manual_seed(0)
    model = config.build(m)
    prompt = _batch(0)["input_ids"][:, :4]
    if not sample:
        return model.generate(prompt, 6)
    generator = torch.Generator().manual_seed(rank)  # different on every rank on purpose
    with count_collectives() as c:
        out = model.generate(prompt, 6, temperature=0.8, top_k=5, generator=generator)
    assert model.training  # generate() restores the mode
    return out, c.by_kind()


def _greedy_without_cache(config):
    """Greedy decoding by full forwards on one rank: what the KV cache must reproduce."""
    torch.manual_seed(0)
    model = config.build(mesh(1)).eval()
    ids = _batch(0)["input_ids"][:, :4]
    for _ in range(6):
        next_id = model(ids)[:, -1, :config.vocab_size].argmax(-1, keepdim=True)
        ids = torch.cat([ids, next_id], 1)
    return ids


@pytest.mark.parametrize("name", ["gpt2", "llama-gqa-sp"])
def test_generate(name):
    config = CONFIGS[name]
    expect = _dist.run(1, _greedy_without_cache, config)[0]
    for n in (1, 2, 4):
        for out in _dist.run(n, _generate, config, False):
            torch.testing.assert_close(out, expect, rtol=0, atol=0)
    results = _dist.run(4, _generate, config, True)
    for out, _ in results:  # every rank returns rank 0's draw
        torch.testing.assert_close(out, results[0][0], rtol=0, atol=0)
    assert results[0][0].shape == (B, 10)
    assert results[0][1]["broadcast"] == 6  # one per sampled token


def _check_sp_length():
    torch.manual_seed(0)
    model = CONFIGS["gpt2-sp"].build(mesh(2))
    message = r"sequence length T \(sequence_parallel\)=7 is not divisible by tp=2"
    with pytest.raises(ValueError, match=message):
        model.loss({"input_ids": torch.zeros(B, 7, dtype=torch.long)})


def test_sequence_parallel_needs_divisible_length():
    _dist.run(2, _check_sp_length)


def _check_build_errors():
    m = mesh(4)
    with pytest.raises(ValueError, match="n_heads=6, n_kv_heads=6, tp=4"):
        GPTConfig(**SMALL | {"d_model": 24}, n_heads=6).build(m)
    with pytest.raises(ValueError, match="n_heads=12, n_kv_heads=6, tp=4"):
        GPTConfig(**SMALL | {"d_model": 48}, n_heads=12, n_kv_heads=6).build(m)
    with pytest.raises(ValueError, match="d_ff=30 is not divisible by tp=4"):
        GPTConfig(**SMALL | {"d_ff": 30}, n_heads=4).build(m)


def test_build_rejects_sizes_tp_cannot_split():
    _dist.run(4, _check_build_errors)


@pytest.mark.parametrize("bad,match", [
    ({"n_heads": 5}, "d_model=32 is not divisible by n_heads=5"),
    ({"n_heads": 8, "n_kv_heads": 3}, "n_heads=8 is not divisible by n_kv_heads=3"),
    ({"norm": "batchnorm"}, "norm='batchnorm' is not one of"),
    ({"activation": "relu"}, "activation='relu' is not one of"),
    ({"positions": "alibi"}, "positions='alibi' is not one of"),
    ({"dtype": "int8"}, "dtype='int8' is not one of"),
    ({"dropout": 1.0}, r"dropout=1.0 must be in \[0, 1\)"),
    ({"n_layers": 0}, "n_layers=0 must be a positive integer"),
    ({"positions": "rope", "d_model": 36, "n_heads": 4}, "RoPE needs an even head_dim"),
    ({"init_std": 0.0}, "init_std=0.0 must be positive"),
])
def test_config_validation(bad, match):
    with pytest.raises(ValueError, match=match):
        GPTConfig(**(SMALL | {"n_heads": 4} | bad))


def test_config_defaults_and_pickling():
    config = GPTConfig(**SMALL, n_heads=4)
    assert (config.n_kv_heads, config.head_dim, config.torch_dtype) == (4, 8, torch.float64)
    assert GPTConfig(d_model=64, n_heads=4).d_ff == 256
    assert pickle.loads(pickle.dumps(config)) == config
    with pytest.raises(AttributeError):
        config.n_heads = 8  # frozen


def _matmul_weights(config):
    torch.manual_seed(0)
    model = config.build(mesh(1))
    assert isinstance(model, GPT)
    in_layers = sum(p.numel() for name, p in model.named_parameters()
                    if name.startswith("layers.") and p.dim() == 2)
    return in_layers, model.num_flops_per_token(), model.num_flops_per_token(4)


@pytest.mark.parametrize("name", ["gpt2", "llama-gqa"])
def test_flops_per_token(name):
    config = CONFIGS[name]
    in_layers, flops, flops_short = _dist.run(1, _matmul_weights, config)[0]
    matmul = in_layers + config.vocab_size * config.d_model  # + the LM head, tied or not
    attention = 12 * config.n_layers * config.d_model
    assert flops == 6 * matmul + attention * config.max_seq_len
    assert flops_short == 6 * matmul + attention * 4
