"""Gradient accumulation: a batch run as ``k`` micro-batches, one optimizer step.

A rank's batch (its DP group's slice) is split along dim 0 into ``k`` equal
micro-batches. Each runs forward and backward in turn (only one graph is alive at a
time); the loss, its gradients and the metrics are those of the whole batch:

- A loss function reports how many items its (mean) loss is over as
  ``extras["loss_tokens"]`` (an int or a 0-dim tensor); without it, the micro-batch's
  samples. The default loss of a raytp GPT reports its labels that are not
  ``ignore_index`` (:meth:`raytp.models.GPT.loss_tokens`).
- Micro-batch ``i``, of mean loss ``l_i`` over ``n_i`` items, back-propagates
  ``l_i * n_i``; at the step the gradients are divided by ``N = sum n_i``. So the
  gradient is that of ``sum_i l_i n_i / N``, the mean over every counted item of the
  whole batch, not a mean of micro-batch means. A micro-batch with ``n_i = 0`` adds
  nothing (its backward is skipped); a batch with ``N = 0`` back-propagates its NaN loss,
  as one batch would.
- The loss reported is ``sum_i l_i n_i / N``; numeric extras are weighted the same way.

No collective of its own: the gradient sync (TP and DP) runs once, at the step.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import torch

TOKENS_KEY = "loss_tokens"


class Accumulated(NamedTuple):
    """What a batch's micro-batches leave: the whole batch's ``loss`` (with its graph
    when ``k == 1``), its ``extras``, the tensor ``backward()`` must still back-propagate
    (None: nothing left), and the factor the gradients need at the step."""

    loss: torch.Tensor
    extras: dict[str, Any]
    to_backward: torch.Tensor | None
    grad_scale: float


def check_micro_batches(batch_size: int, micro_batches: int) -> int:
    """The micro-batch size; a ValueError naming both sizes unless ``micro_batches`` divides."""
    if batch_size % micro_batches:
        raise ValueError(f"micro_batches={micro_batches} does not divide the batch size {batch_size} of "
                         "each DP group: every micro-batch takes an equal slice")
    return batch_size // micro_batches


def split(batch: Mapping[str, torch.Tensor], micro_batches: int) -> list[dict[str, torch.Tensor]]:
    """``batch`` cut along dim 0 into ``micro_batches`` equal dicts (views)."""
    first = next(iter(batch.values()))
    size = check_micro_batches(int(first.shape[0]), micro_batches)
    return [{k: v[i * size:(i + 1) * size] for k, v in batch.items()} for i in range(micro_batches)]


def loss_parts(out, batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, Any], Any]:
    """A loss function's result as ``(scalar loss, extras, items it is the mean of)``."""
    loss, extras = out if isinstance(out, tuple) else (out, {})
    if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
        raise TypeError(f"the loss function must return a scalar tensor, got {loss!r}")
    extras = dict(extras)
    tokens = extras.pop(TOKENS_KEY, None)
    if tokens is None:
        first = next(iter(batch.values()))
        tokens = int(first.shape[0]) if first.dim() else 1
    return loss, extras, tokens


def run(compute: Callable, batch: Mapping[str, torch.Tensor], micro_batches: int,
        backward: Callable[[torch.Tensor], None] | None) -> Accumulated:
    """Run ``batch`` as ``micro_batches`` micro-batches: ``compute(micro_batch)`` gives
    ``(loss, extras, tokens)``; ``backward(tensor)`` back-propagates (None: forward only).
    All but the last are back-propagated here; the last is left for the caller."""
    if micro_batches == 1:
        loss, extras, _ = compute(batch)
        return Accumulated(loss, extras, loss, 1.0)
    parts, total, loss_sum, last = [], 0, 0.0, None
    for i, micro in enumerate(split(batch, micro_batches)):
        loss, extras, tokens = compute(micro)
        n = int(tokens)
        parts.append((n, extras))
        total += n
        if n:
            loss_sum = loss_sum + loss.detach() * n
        scaled = loss * n if n else None
        if i + 1 < micro_batches and backward is not None and scaled is not None:
            backward(scaled)
        last = (loss, scaled)
    if total == 0:  # nothing counted: the NaN of a mean over no items, as one batch gives
        return Accumulated(last[0].detach(), _weighted(parts, 0), last[0] if backward else None, 1.0)
    mean = loss_sum / total
    return Accumulated(mean, _weighted(parts, total), last[1] if backward else None, 1.0 / total)


def _weighted(parts: list[tuple[int, dict[str, Any]]], total: int) -> dict[str, Any]:
    """Numeric extras weighted by each micro-batch's share of the items; others: the last's."""
    out: dict[str, Any] = {}
    for key in parts[-1][1]:
        values = [(n, extras.get(key)) for n, extras in parts]
        if all(isinstance(v, (int, float)) and not isinstance(v, bool) for _, v in values):
            out[key] = sum(n * v for n, v in values) / total if total else values[-1][1]
        else:
            out[key] = values[-1][1]
    return out


@torch.no_grad()
def scale_grads_(params, scale: float) -> None:
    """Multiply every gradient by ``scale`` (1.0: nothing to do)."""
    if scale == 1.0:
        return
    for p in params:
        if p.grad is not None:
            p.grad.mul_(scale)
