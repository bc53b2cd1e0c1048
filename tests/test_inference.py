"""The decoding engine on gloo worlds without Ray (raytp.inference): greedy tokens of
ragged prompts through fewer slots than prompts equal those of full forwards, at tp 1
and 2, GPT-2 and Llama style, across the attention length buckets and while slots are
compacted; the scheduler's decisions; a training rank's generation leaves its mode,
RNG and memory as they were; the sizing of the cache."""

import pytest
import torch

import raytp
from raytp.engine import BuildSpec, build_engine
from raytp.inference import SamplingParams, generate
from raytp.inference.cache import CacheShape, size_cache
from raytp.inference.scheduler import PREFILL_TOKENS, Request, Scheduler, bucket, make_requests
from raytp.models import GPTConfig

import _dist
from helpers import mesh, world

VOCAB = 61  # tp=2 does not divide it
LLAMA = GPTConfig(vocab_size=VOCAB, n_layers=2, n_heads=4, n_kv_heads=2, d_model=32, d_ff=64,
                  max_seq_len=160, norm="rmsnorm", activation="swiglu", positions="rope", bias=False,
                  tie_embeddings=False, dtype="float64", init_std=0.3)
GPT2 = GPTConfig(vocab_size=VOCAB, n_layers=2, n_heads=4, d_model=32, max_seq_len=160, dtype="float64",
                 init_std=0.3)
# lengths 1..130: attention reads 64, then 128, then all 160 positions; 9 prompts through 4 slots
LENGTHS = [1, 7, 60, 3, 130, 20, 2, 61, 12]
NEW = 9


def _prompts(lengths=LENGTHS, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in lengths]


def _new_tokens(i):
    return NEW + 3 * (i % 3)  # sequences end at different steps: slots free, refill and compact


def _greedy_by_full_forward(config, prompts):
    """One prompt at a time, the whole sequence through the model at every step (tp=1)."""
    torch.manual_seed(0)
    model = config.build(mesh(1)).eval()
    out = []
    with torch.no_grad():
        for i, p in enumerate(prompts):
            ids = torch.tensor([p])
            for _ in range(_new_tokens(i)):
                ids = torch.cat([ids, model(ids)[:, -1, :VOCAB].argmax(-1, keepdim=True)], 1)
            out.append(ids[0, len(p):].tolist())
    return out


def _run(generator, requests):
    """Every request's ids, driving ``generator`` as the driver does."""
    out = [[] for _ in requests]
    result = generator.steps(requests, 4, start=True)
    while True:
        for index, token in result["events"]:
            out[index].append(token)
        if result["idle"]:
            return out, generator.stats
        result = generator.steps([], 4)


def _engine_generates(config, prompts, max_batch):
    rank, n = world()
    engine = build_engine(mesh(n), BuildSpec(config, optimizer=None, max_batch=max_batch))
    requests = [Request(i, tuple(p), SamplingParams(_new_tokens(i)), 0) for i, p in enumerate(prompts)]
    return _run(engine.generation, requests)


@pytest.mark.parametrize("config", [LLAMA, GPT2], ids=["llama", "gpt2"])
def test_greedy_tokens_equal_full_forwards(config):
    """9 prompts of lengths 1..130 through 4 slots, ending at different steps."""
    prompts = _prompts()
    expect = _dist.run(1, _greedy_by_full_forward, config, prompts)[0]
    for n in (1, 2):
        for out, stats in _dist.run(n, _engine_generates, config, prompts, 4):
            assert out == expect, n
            assert stats["prefills"] >= 3 and stats["active_slot_steps"] < 4 * stats["decode_steps"]
            assert stats["slot_moves"] > 0  # the tail was compacted into smaller buckets


def _decode_logits_match(config, lengths):
    """Every step's logits (this rank's columns), prefill and decode, one sequence at a time
    through one slot, equal those of a full forward of the finished sequence (float64)."""
    rank, n = world()
    engine = build_engine(mesh(n), BuildSpec(config, optimizer=None, max_batch=1))
    model, calls = engine.model, []
    forward_at = model.forward_at

    def recorded(ids, positions, kv_cache, last=None):
        out = forward_at(ids, positions, kv_cache, last)
        calls.append(out.reshape(out.shape[0], -1).clone())  # (1, V_r) either way
        return out

    model.forward_at = recorded
    prompts = _prompts(lengths, seed=1)
    requests = [Request(i, tuple(p), SamplingParams(NEW), 0) for i, p in enumerate(prompts)]
    out, _ = _run(engine.generation, requests)
    del model.forward_at
    steps = iter(calls)
    with torch.no_grad():
        for prompt, new in zip(prompts, out, strict=True):
            full = model(torch.tensor([prompt + new]))[0]  # (T, V_r)
            for t in range(NEW):
                torch.testing.assert_close(next(steps)[0], full[len(prompt) - 1 + t], rtol=1e-10, atol=1e-10)
    assert next(steps, None) is None


@pytest.mark.parametrize("n", [1, 2])
def test_decode_logits_equal_full_forward(n):
    """Sequences whose positions cross 64 and 128, where attention starts reading more of the cache."""
    _dist.run(n, _decode_logits_match, LLAMA, [60, 122])


def test_scheduler_admits_to_the_lowest_free_slots_and_compacts():
    sp = SamplingParams(3, stop_token_ids=(7,))
    requests = [Request(i, (1,) * n, sp, 0) for i, n in enumerate([2, 3, 4, 5, 6])]
    s = Scheduler(4, capacity=16)
    s.add(requests)
    assert [(slot, r.index) for slot, r in s.admit()] == [(0, 0), (1, 1), (2, 2), (3, 3)]
    assert s.admit() == [] and len(s.waiting) == 1
    assert s.record(1, 7)  # a stop id ends the sequence at once
    assert s.active() == [0, 2, 3]
    assert [(slot, r.index) for slot, r in s.admit()] == [(1, 4)]
    for slot in (0, 1, 2):
        assert not s.record(slot, 5)
        assert not s.record(slot, 5)
        assert s.record(slot, 5)  # max_new_tokens=3
    assert s.active() == [3] and s.compact() == [(3, 0)] and s.active() == [0]
    assert s.slots[0].request.index == 3 and s.shape() == (1, 16)  # capacity 16 < the 64 bucket
    assert [bucket(n, 48) for n in (1, 2, 3, 5, 17, 33, 48)] == [1, 2, 4, 8, 32, 48, 48]


def test_cancelled_requests_leave_the_queue_and_free_their_slots():
    requests = [Request(i, (1, 2), SamplingParams(5), 0) for i in range(4)]
    s = Scheduler(2, capacity=16)
    s.add(requests)
    s.admit()
    assert s.cancel([3, 1, 99]) == [1]  # 1 held slot 1, 3 was waiting, 99 is unknown
    assert [r.index for _, r in s.admit()] == [2] and not s.waiting  # 2 takes the freed slot
    assert s.active() == [0, 1] and s.slots[1].request.index == 2
    assert s.cancel([0, 2]) == [0, 2] and s.idle
    keyed = Request(7, (1,), SamplingParams(1), 5, key_index=0)
    first, seventh = Request(0, (1,), SamplingParams(1), 5), Request(7, (1,), SamplingParams(1), 5)
    assert keyed.key == first.key != seventh.key


def test_prefill_batches_are_bounded():
    long = PREFILL_TOKENS // 2 + 1
    s = Scheduler(8, capacity=PREFILL_TOKENS + 16)
    s.add([Request(i, (1,) * n, SamplingParams(1), 0) for i, n in enumerate([10, long, 10, long])])
    assert [r.index for _, r in s.admit()] == [0]  # two padded to `long` would pass the budget
    assert [r.index for _, r in s.admit()] == [1]
    assert [r.index for _, r in s.admit()] == [2]


def test_requests_are_checked():
    sp = SamplingParams(4)
    made = make_requests([[1, 2], (3,)], sp, vocab_size=5, max_seq_len=8)
    assert [r.prompt for r in made] == [(1, 2), (3,)]
    import numpy as np

    rows = make_requests(np.array([[1, 2], [3, 4]]), sp, vocab_size=5, max_seq_len=8)
    assert [r.prompt for r in rows] == [(1, 2), (3, 4)] and rows[0].seed == rows[1].seed
    for prompts, match in [([[1], []], r"prompt 1 is empty"), ([[1, 5]], r"prompt 0 holds id 5, outside"),
                           ([[-1]], r"holds id -1"), ([[1.0]], r"prompt 0 has dtype float64"),
                           ([[1] * 5], r"needs 9 positions, beyond the model's max_seq_len=8"),
                           ("abc", r"prompts must be a list")]:
        with pytest.raises(ValueError, match=match):
            make_requests(prompts, sp, vocab_size=5, max_seq_len=8)
    with pytest.raises(ValueError, match=r"needs 7 positions, beyond the KV cache's max_len=6"):
        make_requests([[1] * 3], sp, vocab_size=5, max_seq_len=8, max_len=6)
    with pytest.raises(ValueError, match=r"stop_token_ids \[5\] are outside"):
        make_requests([[1]], SamplingParams(1, stop_token_ids=(5,)), vocab_size=5, max_seq_len=8)


def test_cache_sizes():
    shape = CacheShape(n_layers=2, kv_heads=2, head_dim=8, dtype=torch.bfloat16)
    cpu = torch.device("cpu")
    default = size_cache(shape, 100, cpu, None, None)
    assert (default.max_batch, default.max_len) == (8, 100)
    sized = size_cache(shape, 100, cpu, 3, 50)
    assert (sized.max_batch, sized.max_len, sized.capacity) == (3, 50, 64)
    assert sized.nbytes == 3 * 64 * 2 * 2 * 2 * 8 * 2
    with pytest.raises(ValueError, match=r"max_len=101 exceeds the model's max_seq_len=100"):
        size_cache(shape, 100, cpu, None, 101)


def _training_rank_generates():
    """A training rank: generation between steps leaves the model in train mode, the
    RNG states as they were, and no cache behind; the next step's loss is the one without it."""
    rank, n = world()
    config = GPTConfig(**{**LLAMA.__dict__, "dropout": 0.1, "dtype": "float64"})
    batch = {"input_ids": torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(1))}
    losses = {}
    for with_generate in (False, True):
        engine = build_engine(mesh(n), BuildSpec(config, optimizer=raytp.AdamW(lr=1e-2), seed=3))
        engine.train_step(batch)
        if with_generate:
            before = engine.rng_state()
            out = generate(engine.generation, _prompts([3, 5, 2]), SamplingParams(4, temperature=1.0, seed=0))
            assert [len(o) for o in out] == [4, 4, 4]
            assert engine.generation.engine is None  # freed
            assert engine.model.training
            for name, state in engine.rng_state().items():
                torch.testing.assert_close(state, before[name], rtol=0, atol=0, msg=name)
        losses[with_generate] = engine.train_step(batch)["loss"]
    assert losses[True] == losses[False]
    return losses


def test_generation_on_a_training_rank_disturbs_nothing():
    _dist.run(2, _training_rank_generates)
