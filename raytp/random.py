"""Randomness that knows the TP layout: the same dropout mask where a tensor is
replicated, a different one on each rank where it is sharded.

A model holds one :class:`RNGTracker`, seeded from one seed and its TP rank, and its
dropout runs inside ``tracker.fork(region)``:

- ``"replicated"``: the same state on every rank of the TP group (the residual
  stream and embedding output without sequence parallelism), so that the replicas
  of a tensor stay equal;
- ``"sharded"``: a state per TP rank (attention probabilities of the local heads,
  activations split along the sequence under sequence parallelism), so that the
  shards of one tensor get independent masks, as on one device.

The tracker swaps its state in and out of the default generator of its device, so
ops without a ``generator`` argument (``F.dropout``, ``scaled_dot_product_attention``)
draw from it; two models hold two trackers and do not disturb each other.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

REGIONS = ("replicated", "sharded")
_SHARDED_OFFSET = 2718  # Megatron-LM's offset of the model-parallel seed


class RNGTracker:
    """Named RNG states for the TP regions of one model on one rank.

    ``"replicated"`` is seeded from ``seed``; ``"sharded"`` from ``seed``, an offset and
    ``tp_rank``. The default generator of ``device`` is left as it was after a fork.
    """

    def __init__(self, seed: int, tp_rank: int, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        if self.device.type == "meta":
            self.device = torch.device("cpu")
        self.seed, self.tp_rank = seed, tp_rank
        seeds = {"replicated": seed, "sharded": seed + _SHARDED_OFFSET + tp_rank}
        self.states = {name: torch.Generator(self.device).manual_seed(s).get_state()
                       for name, s in seeds.items()}

    def _get(self) -> torch.Tensor:
        if self.device.type == "cuda":
            return torch.cuda.get_rng_state(self.device)
        return torch.get_rng_state()

    def _set(self, state: torch.Tensor) -> None:
        if self.device.type == "cuda":
            torch.cuda.set_rng_state(state, self.device)
        else:
            torch.set_rng_state(state)

    @contextmanager
    def fork(self, region: str):
        """Draw from ``region``'s state inside the block, and keep where it got to."""
        if region not in self.states:
            raise ValueError(f"region={region!r} is not one of {REGIONS}")
        outside = self._get()
        self._set(self.states[region])
        try:
            yield
        finally:
            self.states[region] = self._get()
            self._set(outside)

    def __repr__(self):
        return f"RNGTracker(seed={self.seed}, tp_rank={self.tp_rank}, device={self.device})"


class TPDropout(nn.Module):
    """``F.dropout`` drawing from ``rng``'s ``region`` state (see the module docstring)."""

    def __init__(self, p: float, rng: RNGTracker | None, region: str):
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout p={p} must be in [0, 1)")
        if p > 0 and rng is None:
            raise ValueError("dropout > 0 needs an RNGTracker")
        if region not in REGIONS:
            raise ValueError(f"region={region!r} is not one of {REGIONS}")
        self.p, self.rng, self.region = p, rng, region

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        with self.rng.fork(self.region):
            return F.dropout(x, self.p, training=True)

    def extra_repr(self):
        return f"p={self.p}, region={self.region!r}"


def rng_state(tracker: RNGTracker | None, device: torch.device) -> dict[str, torch.Tensor]:
    """Every RNG state a rank's training draws from, as CPU byte tensors: torch's CPU
    generator, the CUDA one of ``device``, and ``tracker``'s regions."""
    states = {"torch_cpu": torch.get_rng_state()}
    if device.type == "cuda":
        states["cuda"] = torch.cuda.get_rng_state(device)
    if tracker is not None:
        states |= {f"tracker/{region}": state.clone() for region, state in tracker.states.items()}
    return states


def set_rng_state(states: dict[str, torch.Tensor], tracker: RNGTracker | None, device: torch.device,
                  *, same_tp_rank: bool) -> None:
    """Restore what :func:`rng_state` returned. The tracker's ``"sharded"`` region is
    restored only on the same TP rank of the same tp (``same_tp_rank``): under another
    tp a rank holds other heads, so it keeps the state it was seeded with."""
    torch.set_rng_state(states["torch_cpu"])
    if device.type == "cuda" and "cuda" in states:
        torch.cuda.set_rng_state(states["cuda"], device)
    if tracker is None:
        return
    for region in tracker.states:
        key = f"tracker/{region}"
        if key in states and (region == "replicated" or same_tp_rank):
            tracker.states[region] = states[key].clone()
