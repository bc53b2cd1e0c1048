"""Helpers for jobs that run on every rank (see ``_dist``)."""

from __future__ import annotations

import functools

import torch
import torch.distributed as dist

import raytp
from raytp.params import get_spec
from raytp.placement import Replicate

F64 = {"rtol": 1e-10, "atol": 1e-10}  # float64: only rounding differs


@functools.cache
def mesh(tp: int, dp: int = 1) -> raytp.DeviceMesh:
    """One mesh per shape and process; building one is a collective, so every rank asks
    for the same shapes in the same order."""
    return raytp.DeviceMesh(tp=tp, dp=dp)


def world() -> tuple[int, int]:
    return dist.get_rank(), dist.get_world_size()


def expected_local(param: torch.Tensor, full: torch.Tensor, tp_rank: int) -> torch.Tensor:
    """What ``param`` on this rank should hold when the full tensor is ``full``."""
    spec = get_spec(param)
    if spec is None or isinstance(spec.placement, Replicate):
        return full
    pad = spec.global_shape[0] - full.shape[0]
    if pad:  # a vocabulary padded to a multiple of tp: pad the reference with zero rows
        full = torch.nn.functional.pad(full, [0, 0] * (full.dim() - 1) + [0, pad])
    return spec.shard(full, tp_rank)


def assert_params_match(tp_module, ref_module, tp_rank, *, grads=False, **tol):
    """Every parameter (or its gradient) of ``tp_module`` is this rank's part of the
    same-named one of ``ref_module``."""
    tol = tol or F64
    ref = dict(ref_module.named_parameters())
    for name, p in tp_module.named_parameters():
        full = ref[name].grad if grads else ref[name]
        local = p.grad if grads else p
        assert local is not None and full is not None, f"{name}: missing gradient"
        torch.testing.assert_close(local.detach(), expected_local(p, full.detach(), tp_rank),
                                   msg=lambda m, n=name: f"{n} ({'grad' if grads else 'value'}): {m}",
                                   **tol)
