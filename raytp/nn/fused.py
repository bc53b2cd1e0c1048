"""Pointwise pieces of a block, each fused into one kernel forward and one backward.

RoPE (a slice, a negation, a concatenation, two products and a sum per tensor) and
SwiGLU (``silu(gate) * up``) are memory-bound chains of small ops: eager PyTorch runs
each op as its own kernel, over strided views, and keeps its temporaries for backward.
On one H200 they took ~19 ms of a 145 ms training step of a 1.1B Llama-style model
(``scripts/profile_step.py``). :class:`Fused` runs such a pure function through
``torch.compile`` (one Triton kernel each way) where that pays: on CUDA, with autograd
recording (training), and outside an enclosing compiled region (which fuses it itself).
Elsewhere — CPU, inference, CUDA-graph capture — it calls the function as is: the same
math, so the two paths agree to rounding. A compilation that fails logs one warning
with the reason and the function runs eager from then on.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

log = logging.getLogger(__name__)


class Fused:
    """``fn``, compiled on the first call that should fuse (see the module docstring)."""

    devices = frozenset({"cuda"})  # where compiling pays; tests add "cpu" to check the compiled math

    def __init__(self, fn: Callable):
        self.fn, self.name = fn, fn.__name__
        self.compiled: Callable | None = None
        self.failed = False

    def should_fuse(self, x: torch.Tensor) -> bool:
        return (not self.failed and x.device.type in self.devices and torch.is_grad_enabled()
                and not torch.compiler.is_compiling())

    def __call__(self, *args):
        if not self.should_fuse(args[0]):
            return self.fn(*args)
        if self.compiled is None:
            self.compiled = torch.compile(self.fn, fullgraph=True)
        try:
            return self.compiled(*args)
        except Exception as e:  # noqa: BLE001 (an error eager raises too is raised below)
            self.failed = True
            log.warning("raytp: %s runs eager: torch.compile failed: %s", self.name,
                        str(e).splitlines()[0] if str(e) else type(e).__name__)
            return self.fn(*args)
