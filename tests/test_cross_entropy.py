"""vocab_parallel_cross_entropy against F.cross_entropy on the gathered, unpadded logits:
the loss (the same on every rank) and the gradient of each rank's logit columns, for
vocabularies tp does and does not divide, label smoothing, ignore_index and every
reduction, at tp 1, 2 and 4 (float64, exact comparison, no golden numbers)."""

import pytest
import torch
import torch.nn.functional as F

from raytp.comm import count_collectives
from raytp.nn import padded_vocab, vocab_parallel_cross_entropy

import _dist
from helpers import F64, mesh, randn, world

WORLDS = [1, 2, 4]
VOCABS = [16, 13, 3]  # divisible by every tp; not; at tp=4 the last rank holds only padding


def _case(vocab, n, ignore_index, seed):
    """Full padded logits (junk in the padding), targets with some ignored, and an
    upstream gradient for reduction="none"."""
    padded = padded_vocab(vocab, n)
    logits = randn(2, 5, padded, seed=seed) * 3
    logits[..., vocab:] = 1e3  # padding columns: must not count
    g = torch.Generator().manual_seed(seed + 1)
    targets = torch.randint(0, vocab, (2, 5), generator=g)
    targets[0, 1] = targets[1, 4] = ignore_index
    targets[1, 0] = vocab - 1  # the last real column, next to the padding
    return logits, targets, randn(2, 5, seed=seed + 2)


def _check_cross_entropy(reduction, label_smoothing, ignore_index):
    rank, n = world()
    tp = mesh(n).tp_comm
    counts = []
    for seed, vocab in enumerate(VOCABS):
        full, targets, grad_none = _case(vocab, n, ignore_index, seed)
        local = full.chunk(n, -1)[rank].clone().requires_grad_()
        with count_collectives() as fwd:
            loss = vocab_parallel_cross_entropy(local, targets, comm=tp, vocab_size=vocab,
                                                ignore_index=ignore_index,
                                                label_smoothing=label_smoothing, reduction=reduction)
        ref_logits = full[..., :vocab].clone().requires_grad_()
        ref = F.cross_entropy(ref_logits.transpose(1, 2), targets, ignore_index=ignore_index,
                              label_smoothing=label_smoothing, reduction=reduction)
        torch.testing.assert_close(loss, ref, **F64)
        upstream = grad_none if reduction == "none" else torch.tensor(1.7, dtype=torch.float64)
        with count_collectives() as bwd:
            loss.backward(upstream)
        ref.backward(upstream)
        ref_grad = F.pad(ref_logits.grad, (0, full.shape[-1] - vocab))  # zero on the padding
        torch.testing.assert_close(local.grad, ref_grad.chunk(n, -1)[rank], **F64)
        counts.append((fwd.by_kind(), bwd.by_kind()))
    return loss.detach(), counts


@pytest.mark.parametrize("n", WORLDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_cross_entropy_matches_torch(n, reduction, label_smoothing):
    results = _dist.run(n, _check_cross_entropy, reduction, label_smoothing, -100)
    for loss, _ in results[1:]:  # the same loss on every rank, bit for bit
        torch.testing.assert_close(loss, results[0][0], rtol=0, atol=0)
    for fwd, bwd in results[0][1]:
        assert (fwd, bwd) == (({"all_reduce_max": 1, "all_reduce": 1}, {}) if n > 1 else ({}, {}))


def test_custom_ignore_index():
    _dist.run(2, _check_cross_entropy, "mean", 0.2, 3)  # an id inside the vocabulary


def _check_bf16():
    """16-bit logits: computed in float32, against F.cross_entropy of the float32 logits."""
    rank, n = world()
    full, targets, _ = _case(13, n, -100, 0)
    local = full.chunk(n, -1)[rank].bfloat16().requires_grad_()
    loss = vocab_parallel_cross_entropy(local, targets, comm=mesh(n).tp_comm, vocab_size=13,
                                        label_smoothing=0.1)
    ref_logits = full[..., :13].bfloat16().float().requires_grad_()
    ref = F.cross_entropy(ref_logits.transpose(1, 2), targets, label_smoothing=0.1)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=1e-6)
    loss.backward()
    ref.backward()
    assert local.grad.dtype == torch.bfloat16
    expect = F.pad(ref_logits.grad, (0, full.shape[-1] - 13)).chunk(n, -1)[rank]
    torch.testing.assert_close(local.grad.float(), expect, rtol=1e-2, atol=1e-4)  # bf16 rounding


def test_bfloat16_logits():
    _dist.run(2, _check_bf16)


def _check_bad_arguments():
    tp = mesh(2).tp_comm
    logits, targets = torch.zeros(3, 4), torch.zeros(3, dtype=torch.long)
    with pytest.raises(ValueError, match="reduction='avg' is not one of"):
        vocab_parallel_cross_entropy(logits, targets, comm=tp, vocab_size=8, reduction="avg")
    with pytest.raises(ValueError, match=r"vocab_size=9 must be in \[1, 8\]"):
        vocab_parallel_cross_entropy(logits, targets, comm=tp, vocab_size=9)
    with pytest.raises(ValueError, match="label_smoothing=1.5"):
        vocab_parallel_cross_entropy(logits, targets, comm=tp, vocab_size=8, label_smoothing=1.5)
    with pytest.raises(ValueError, match="must agree on every dim but the last"):
        vocab_parallel_cross_entropy(logits, targets[:2], comm=tp, vocab_size=8)


def test_bad_arguments():
    _dist.run(2, _check_bad_arguments)
