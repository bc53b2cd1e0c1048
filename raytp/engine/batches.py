"""A batch on a rank: the default loss, the copy to the device, and what it holds."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from raytp.streams import copy_to_device


def default_loss(model: nn.Module, batch: Mapping[str, torch.Tensor]):
    """``model.loss(batch)`` when the model has one (with ``loss_tokens``, the items its
    mean is over, when the model counts them: ``model.loss_tokens(batch)``); else
    cross-entropy of ``model(x)`` against ``y``, with the accuracy as an extra metric."""
    if hasattr(model, "loss"):
        if hasattr(model, "loss_tokens"):
            return model.loss(batch), {"loss_tokens": model.loss_tokens(batch)}
        return model.loss(batch)
    if "x" not in batch or "y" not in batch:
        raise ValueError(f"the default loss needs batch keys 'x' and 'y' (got {sorted(batch)}); "
                         "pass loss_fn=... to build()")
    logits = model(batch["x"])
    loss = F.cross_entropy(logits, batch["y"])
    return loss, {"accuracy": (logits.argmax(-1) == batch["y"]).float().mean().item()}


def to_device(batch: Mapping[str, Any], device: torch.device, stream=None):
    """Tensors on ``device`` from a dict of numpy arrays or CPU tensors, and the copies
    the compute stream must wait for. On CUDA they are copied from pinned memory on
    ``stream`` (the data stream), so they can be issued ahead of use."""
    if not isinstance(batch, Mapping) or not batch:
        raise ValueError(f"a batch is a non-empty dict of arrays, got {type(batch).__name__}")
    out, pending = {}, []
    for key, value in batch.items():
        if isinstance(value, np.ndarray):
            value = torch.from_numpy(np.array(value))  # the object store's arrays are read-only
        elif not isinstance(value, torch.Tensor):
            value = torch.as_tensor(value)
        out[key], work = copy_to_device(value, device, stream)
        if work is not None:
            pending.append(work)
    return out, pending


def batch_items(batch: Mapping[str, torch.Tensor]) -> tuple[int, int]:
    """(samples, tokens) in a batch: tokens are the elements of ``input_ids`` if present."""
    first = next(iter(batch.values()))
    samples = int(first.shape[0]) if first.dim() else 1
    ids = batch.get("input_ids")
    return samples, int(ids.numel()) if ids is not None else samples


class BatchFeed:
    """Batches onto one rank's device, copied on the data ``stream``: the next step's
    batch can be copied ahead (:meth:`prefetch`) while this step runs."""

    def __init__(self, device: torch.device, stream=None):
        self.device, self.stream = device, stream
        self._prefetched: tuple | None = None  # (batch id, tensors, copies in flight)

    def prefetch(self, batch: Mapping[str, Any], batch_id: int) -> None:
        self._prefetched = (batch_id, *to_device(batch, self.device, self.stream))

    def get(self, batch, batch_id) -> dict[str, torch.Tensor]:
        """``batch`` on the device: the prefetched copy when it is this batch."""
        prefetched, self._prefetched = self._prefetched, None
        if prefetched is None or batch_id is None or prefetched[0] != batch_id:
            return self.now(batch)
        tensors, pending = prefetched[1:]
        for work in pending:
            work.wait()
        return tensors

    def now(self, batch) -> dict[str, torch.Tensor]:
        """``batch`` on the device, copied now (any prefetched batch is kept)."""
        tensors, pending = to_device(batch, self.device, self.stream)
        for work in pending:
            work.wait()
        return tensors
