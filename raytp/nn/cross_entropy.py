"""Cross-entropy over logits split along the vocabulary, without gathering them.

Rank r holds columns [r * V_r, (r + 1) * V_r) of the logits of the padded vocabulary;
columns at or past the true ``vocab_size`` are padding and take no part. With
``z`` the logits less their global maximum, ``lse = log(sum_k exp(z_k))`` and ``t``
the target, the loss of a token is

    (1 - eps) * (lse - z_t) + eps * (lse - sum_k z_k / vocab_size)

(``eps`` the label smoothing, the sum over the true vocabulary), exactly what
``torch.nn.functional.cross_entropy`` computes on the gathered, unpadded logits.
Its gradient is ``softmax(z) - q`` with ``q = (1 - eps) * onehot(t) + eps / vocab_size``,
computed locally on each rank's columns.
"""

from __future__ import annotations

import torch

from raytp.comm import functional as cf
from raytp.comm.backend import Communicator

REDUCTIONS = ("mean", "sum", "none")


def _valid_columns(logits: torch.Tensor, comm: Communicator, vocab_size: int) -> tuple[int, int]:
    """(first global column of this rank, how many of its columns are real vocabulary)."""
    per_rank = logits.shape[-1]
    start = comm.rank * per_rank
    return start, max(0, min(per_rank, vocab_size - start))


def _global_max(z: torch.Tensor, comm: Communicator) -> torch.Tensor:
    """(...,) the maximum over the true vocabulary of every rank: one max all-reduce."""
    if z.shape[-1]:
        local = z.amax(-1)
    else:  # this rank holds only padding
        local = z.new_full(z.shape[:-1], float("-inf"))
    return cf.all_reduce_max(local, comm) if comm.size > 1 else local


class _VocabParallelCrossEntropy(torch.autograd.Function):
    """Forward: one max all-reduce and one sum all-reduce of (sum exp, target logit[,
    sum of logits]) per token. Backward: none (the gradient is local)."""

    @staticmethod
    def forward(ctx, logits, targets, comm, vocab_size, ignore_index, label_smoothing, reduction):
        start, n_valid = _valid_columns(logits, comm, vocab_size)
        compute = torch.float32 if logits.dtype in (torch.float16, torch.bfloat16) else logits.dtype
        z = logits[..., :n_valid].to(compute)  # (..., n_valid): this rank's real columns
        z = z - _global_max(z, comm).unsqueeze(-1)
        exp = z.exp()
        mine = (targets >= start) & (targets < start + n_valid)
        local_t = (targets - start).clamp(0, max(n_valid - 1, 0))
        target_z = z.gather(-1, local_t.unsqueeze(-1)).squeeze(-1) if n_valid else z.new_zeros(
            targets.shape)
        sums = [exp.sum(-1), target_z.masked_fill(~mine, 0.0)]
        if label_smoothing:
            sums.append(z.sum(-1))
        sums = torch.stack(sums, -1)  # (..., 2 or 3)
        if comm.size > 1:
            comm.all_reduce(sums)
        lse = sums[..., 0].log()
        loss = (1.0 - label_smoothing) * (lse - sums[..., 1])
        if label_smoothing:
            loss = loss + label_smoothing * (lse - sums[..., 2] / vocab_size)
        keep = targets != ignore_index
        loss = loss.masked_fill(~keep, 0.0)
        ctx.save_for_backward(exp / sums[..., :1], local_t, mine & keep, keep)
        ctx.shape, ctx.dtype, ctx.n_valid = logits.shape, logits.dtype, n_valid
        ctx.smoothing, ctx.vocab_size, ctx.reduction = label_smoothing, vocab_size, reduction
        ctx.count = keep.sum()
        if reduction == "none":
            return loss
        return loss.sum() / ctx.count if reduction == "mean" else loss.sum()

    @staticmethod
    def backward(ctx, grad_loss):
        softmax, local_t, target_here, keep = ctx.saved_tensors
        if ctx.reduction == "mean":
            grad_loss = grad_loss / ctx.count
        weight = (grad_loss * keep).to(softmax.dtype).unsqueeze(-1)  # (..., 1); 0 where ignored
        grad = softmax - ctx.smoothing / ctx.vocab_size  # (..., n_valid)
        if ctx.n_valid:
            hit = -(1.0 - ctx.smoothing) * target_here.to(grad.dtype)
            grad = grad.scatter_add(-1, local_t.unsqueeze(-1), hit.unsqueeze(-1))
        grad_logits = grad.new_zeros(ctx.shape)
        grad_logits[..., :ctx.n_valid] = grad * weight
        return grad_logits.to(ctx.dtype), None, None, None, None, None, None


def vocab_parallel_cross_entropy(logits_shard: torch.Tensor, targets: torch.Tensor, *,
                                 comm: Communicator, vocab_size: int, ignore_index: int = -100,
                                 label_smoothing: float = 0.0, reduction: str = "mean") -> torch.Tensor:
    """``F.cross_entropy`` of the logits split over the vocabulary, never gathered.

    ``logits_shard`` (..., V_padded / tp): this rank's columns of the logits (the
    output of :class:`ParallelLMHead`); ``targets`` (...) int64 ids below
    ``vocab_size``, the true vocabulary (padded columns at or past it take no part),
    or ``ignore_index``. ``reduction="mean"`` averages over the tokens not ignored;
    ``"sum"`` sums; ``"none"`` returns (...) with zeros at ignored tokens. Label
    smoothing spreads ``label_smoothing`` over the true vocabulary. The result is
    the same on every rank, computed in float32 for 16-bit logits.
    Collectives: forward one max all-reduce and one all-reduce; backward none.
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction={reduction!r} is not one of {REDUCTIONS}")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing={label_smoothing} must be in [0, 1]")
    if logits_shard.shape[:-1] != targets.shape:
        raise ValueError(f"logits {tuple(logits_shard.shape)} and targets {tuple(targets.shape)} "
                         "must agree on every dim but the last")
    padded = logits_shard.shape[-1] * comm.size
    if not 0 < vocab_size <= padded:
        raise ValueError(f"vocab_size={vocab_size} must be in [1, {padded}] (tp={comm.size} x "
                         f"{logits_shard.shape[-1]} columns per rank)")
    return _VocabParallelCrossEntropy.apply(logits_shard, targets.long(), comm, vocab_size, ignore_index,
                                            float(label_smoothing), reduction)
