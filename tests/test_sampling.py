"""Choosing tokens on the device (raytp.inference.sampling): SamplingParams are checked;
the first-token distribution over many seeds is softmax(logits / T) restricted by top-k
and top-p (chi-squared); a seed gives the same ids at tp 1, 2 and 4 for every kind of
sampling, from vocabulary-parallel logits whose vocabulary tp does not divide; only
what choosing needs is gathered."""

import numpy as np
import pytest
import torch

import raytp
from raytp.comm import count_collectives
from raytp.inference import sampling as smp
from raytp.inference.sampling import GREEDY, Rows, SamplingParams, VocabShard, choose, kind_of

import _dist
from helpers import mesh, world

scipy_stats = pytest.importorskip("scipy.stats")

VOCAB = 50  # not a multiple of 4: the last rank of tp=4 holds padded columns
P_MIN = 1e-3  # a chi-squared test fails below this p-value


def test_sampling_params_are_checked():
    assert raytp.SamplingParams is SamplingParams
    p = SamplingParams(4, temperature=1, top_k=3, top_p=0.5, stop_token_ids=[2, 7], seed=1)
    assert p.stop_token_ids == (2, 7) and p.temperature == 1.0 and not p.greedy
    with pytest.raises(AttributeError):
        p.seed = 2
    for kwargs, match in [({"max_new_tokens": 0}, r"max_new_tokens=0 must be an integer >= 1"),
                          ({"max_new_tokens": 2.0}, r"max_new_tokens=2.0"),
                          ({"temperature": -0.1}, r"temperature=-0.1 must be a finite number >= 0"),
                          ({"temperature": float("nan")}, r"temperature=nan"),
                          ({"top_k": 0}, r"top_k=0 must be an integer >= 1"),
                          ({"top_p": 0.0}, r"top_p=0.0 must be in \(0, 1\]"),
                          ({"top_p": 1.5}, r"top_p=1.5 must be in \(0, 1\]"),
                          ({"stop_token_ids": 3}, r"stop_token_ids=3 must be a sequence"),
                          ({"stop_token_ids": (-1,)}, r"stop_token_ids=\(-1,\) must be non-negative"),
                          ({"seed": "x"}, r"seed='x' must be an integer")]:
        with pytest.raises(ValueError, match=match):
            SamplingParams(**{"max_new_tokens": 1, **kwargs})


def test_kind_of_a_batch():
    sp = SamplingParams
    assert kind_of([sp(1), sp(1, top_k=3)], VOCAB) == GREEDY  # top-k is moot when greedy
    assert kind_of([sp(1), sp(1, temperature=1.0)], VOCAB).name == "gumbel"
    assert kind_of([sp(1, temperature=1.0, top_k=3), sp(1, temperature=2.0, top_k=80, top_p=0.5)],
                   VOCAB) == ("topk", VOCAB)
    assert kind_of([sp(1, temperature=1.0, top_k=3), sp(1, temperature=1.0)], VOCAB).name == "full"
    assert kind_of([sp(1, temperature=1.0, top_p=0.9)], VOCAB).name == "full"
    assert kind_of([sp(1, temperature=1.0, top_p=1.0)], VOCAB).name == "gumbel"  # keeps everything


def _rows(params, keys, position=5, device="cpu"):
    return Rows.of(params, keys, [position] * len(keys), VOCAB, device)


def _expected(logits: np.ndarray, params: SamplingParams) -> np.ndarray:
    """softmax(logits / T), restricted to the top-k, renormalized, then to the top-p nucleus."""
    p = np.exp((logits - logits.max()) / params.temperature)
    p /= p.sum()
    order = np.argsort(-p, kind="stable")
    keep = np.zeros_like(p, dtype=bool)
    keep[order[:params.top_k or len(p)]] = True
    p = np.where(keep, p, 0.0) / p[keep].sum()
    if params.top_p is not None:
        before = np.cumsum(p[order]) - p[order]
        nucleus = np.zeros_like(keep)
        nucleus[order[before < params.top_p]] = True
        p = np.where(nucleus, p, 0.0) / p[nucleus].sum()
    return p


@pytest.mark.parametrize("params", [
    SamplingParams(1, temperature=0.7),
    SamplingParams(1, temperature=1.3, top_k=5),
    SamplingParams(1, temperature=1.0, top_p=0.8),
    SamplingParams(1, temperature=0.9, top_k=7, top_p=0.75),
], ids=["plain", "top_k", "top_p", "top_k+top_p"])
def test_first_token_distribution_matches_softmax(params):
    """20,000 draws, one per seed, of the first token of one prompt: chi-squared against the
    restricted softmax, p >= 1e-3, and no draw outside the restriction."""
    n, v = 20_000, 12
    logits = torch.randn(v, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * 1.5
    keys = [smp.request_key(seed, 0) for seed in range(n)]
    rows = _rows([params] * n, keys)
    ids = choose(logits.expand(n, v).contiguous(), rows, kind_of([params], v),
                 VocabShard(0, v, v))
    counts = np.bincount(ids.numpy(), minlength=v)
    expected = _expected(logits.numpy(), params) * n
    support = expected > 0
    assert counts[~support].sum() == 0, (counts, expected)
    assert support.sum() >= 3  # a restriction that leaves one token would test nothing
    chi2 = float((((counts - expected) ** 2)[support] / expected[support]).sum())
    p_value = scipy_stats.chi2.sf(chi2, support.sum() - 1)
    assert p_value >= P_MIN, (chi2, p_value, counts, expected.round(1))


def test_kinds_agree_where_they_overlap():
    """The noise depends on (key, position, id) only: a plain sampled row gets the same id
    through the Gumbel, full-vocabulary and top-k (k = vocabulary) paths; a greedy row gets
    the argmax through each."""
    n = 64
    logits = torch.randn(n, VOCAB, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    plain, greedy = SamplingParams(1, temperature=0.8), SamplingParams(1)
    params = [plain if i % 2 else greedy for i in range(n)]
    rows = _rows(params, [smp.request_key(9, i) for i in range(n)])
    shard = VocabShard(0, VOCAB, VOCAB)
    picks = [choose(logits, rows, kind, shard) for kind in (smp.GUMBEL, smp.FULL, smp.Kind("topk", VOCAB))]
    for other in picks[1:]:
        torch.testing.assert_close(other, picks[0], rtol=0, atol=0)
    torch.testing.assert_close(picks[0][::2], logits.argmax(-1)[::2], rtol=0, atol=0)
    assert (picks[0][1::2] != logits.argmax(-1)[1::2]).any()  # the sampled rows did sample


def test_uniforms_are_a_fixed_function_of_key_position_and_id():
    keys, positions = torch.tensor([1, 2**32 - 1]), torch.tensor([0, 7])
    ids = torch.arange(100_000)
    u = smp.uniform(keys, positions, ids)
    torch.testing.assert_close(u, smp.uniform(keys, positions, ids), rtol=0, atol=0)
    assert u.dtype == torch.float32 and u.min() > 0 and u.max() < 1
    assert abs(u.mean().item() - 0.5) < 0.005 and abs(u.var().item() - 1 / 12) < 0.002
    other = smp.uniform(keys, positions + 1, ids)
    assert abs(np.corrcoef(u[0].numpy(), other[0].numpy())[0, 1]) < 0.02  # the next position: fresh numbers
    neighbours = np.corrcoef(u[0, :-1].numpy(), u[0, 1:].numpy())[0, 1]
    assert abs(neighbours) < 0.02  # adjacent ids: independent


CASES = [SamplingParams(1), SamplingParams(1, temperature=0.9), SamplingParams(1, temperature=0.9, top_k=7),
         SamplingParams(1, temperature=1.1, top_k=9, top_p=0.6),
         SamplingParams(1, temperature=0.8, top_p=0.7)]


def _choose_sharded(logits):
    """Every case on this rank's columns of ``logits`` (B, VOCAB), ties included; and the
    collectives of each."""
    rank, n = world()
    m = mesh(n)
    per_rank = -(-VOCAB // n)
    padded = torch.nn.functional.pad(logits, (0, per_rank * n - VOCAB))  # the padded columns are 0
    local = padded[:, rank * per_rank:(rank + 1) * per_rank]
    shard = VocabShard(rank * per_rank, per_rank, VOCAB, m.tp_comm if n > 1 else None)
    out = []
    for params in CASES:
        rows = _rows([params] * logits.shape[0], [smp.request_key(5, i) for i in range(logits.shape[0])])
        with count_collectives() as c:
            ids = choose(local, rows, kind_of([params], VOCAB), shard)
        out.append((ids, c.by_kind(), c.total_bytes))
    return out


def test_a_seed_gives_the_same_ids_at_every_tp():
    b = 16
    logits = torch.randn(b, VOCAB, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 2
    logits[:, VOCAB - 1] = -50.0  # below the padded columns' 0: padding must be masked, not chosen
    logits[0, 3] = logits[0, 40] = logits[0].max() + 1  # a tie across ranks: the lowest id wins
    ref = _dist.run(1, _choose_sharded, logits)[0]
    assert ref[0][0][0] == 3
    for n in (2, 4):
        for got in _dist.run(n, _choose_sharded, logits):
            for (ids, counts, nbytes), (want, _, _), params in zip(got, ref, CASES, strict=True):
                torch.testing.assert_close(ids, want, rtol=0, atol=0, msg=f"tp={n} {params}")
                assert counts == {"all_gather": 1}, (params, counts)
                per_rank = -(-VOCAB // n)
                width = {"greedy": 1, "gumbel": 1, "topk": min(params.top_k or 0, per_rank),
                         "full": per_rank}[kind_of([params], VOCAB).name]
                pairs = 1 if kind_of([params], VOCAB).name == "full" else 2
                assert nbytes == b * width * pairs * 8, (params, nbytes)  # (max, id) pairs or the scores
    assert (ref[1][0] != ref[0][0]).any()  # sampling is not greedy
