"""Helpers for jobs that run on every rank (see ``_dist``)."""

from __future__ import annotations

import functools
from contextlib import contextmanager

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


def randn(*shape, seed: int, dtype=torch.float64) -> torch.Tensor:
    """The same normal tensor on every rank."""
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def chunk(x: torch.Tensor, dim: int) -> torch.Tensor:
    """This rank's chunk of ``x`` along ``dim`` (rank and world from torch.distributed)."""
    rank, n = world()
    return x.chunk(n, dim)[rank]


def assert_state_matches(module, ref_state: dict[str, torch.Tensor], tp_rank: int, **tol):
    """Every parameter of ``module`` is this rank's part of the same-named full tensor in
    ``ref_state`` (a tp=1 model's ``named_parameters``, sent over from another world)."""
    tol = tol or F64
    names = dict(module.named_parameters())
    assert names.keys() == ref_state.keys(), f"{sorted(names)} != {sorted(ref_state)}"
    for name, p in names.items():
        torch.testing.assert_close(p.detach(), expected_local(p, ref_state[name], tp_rank),
                                   msg=lambda m, n=name: f"{n}: {m}", **tol)


def check_parity(module, ref, x, *, local_in, local_out, optimizer=None, grad_seed=2):
    """``module`` (this rank's part) against ``ref`` (the whole, on one process) on the full
    input ``x``: forward, input gradient, every weight gradient after ``sync_grads``, the
    global gradient norm, and the parameters after one SGD and one AdamW step (float64).
    ``local_in`` / ``local_out`` map a full input / output to this rank's part. Returns
    the collective counts of the forward and the backward."""
    from raytp.comm import count_collectives

    m = mesh(dist.get_world_size())
    floating = x.is_floating_point()
    x_ref = x.clone().requires_grad_(floating)
    y_ref = ref(x_ref)
    grad_out = randn(*y_ref.shape, seed=grad_seed)
    (y_ref * grad_out).sum().backward()
    x_tp = local_in(x).clone().requires_grad_(floating)
    with count_collectives() as fwd:
        y = module(x_tp)
    torch.testing.assert_close(y, local_out(y_ref.detach()), **F64)
    with count_collectives() as bwd:
        (y * local_out(grad_out)).sum().backward()
    if floating:
        torch.testing.assert_close(x_tp.grad, local_in(x_ref.grad), **F64)
    raytp.sync_grads(module, m)
    assert_params_match(module, ref, m.tp_rank, grads=True)
    ref_norm = torch.cat([p.grad.flatten() for p in ref.parameters()]).norm()
    torch.testing.assert_close(raytp.grad_norm(module, m).double(), ref_norm, rtol=1e-6, atol=0)
    # one SGD step, then one AdamW step on the same gradients, unless one is given
    optimizers = [optimizer] if optimizer else [raytp.SGD(lr=0.1, momentum=0.9),
                                                 raytp.AdamW(lr=0.01, weight_decay=0.1)]
    for spec in optimizers:
        spec.build(module.parameters()).step()
        spec.build(ref.parameters()).step()
        assert_params_match(module, ref, m.tp_rank)
    return fwd.by_kind(), bwd.by_kind()


@contextmanager
def decomposed_symm_mem(comm):
    """Let ``comm`` (gloo, CPU) run the symmetric-memory path on torch's own decomposed
    versions of the fused ops (all-gather then GEMM; GEMM then reduce-scatter), the
    semantics its fused CUDA kernels implement."""
    from torch.distributed import _symmetric_memory as torch_symm

    from raytp.comm import symm_mem

    decomposed = symm_mem.FusedOps(torch_symm._fused_all_gather_matmul_fallback,
                                   torch_symm._fused_matmul_reduce_scatter_fallback)
    saved = symm_mem.ops, symm_mem._local_reason
    symm_mem.ops, symm_mem._local_reason = (lambda: decomposed), (lambda comm: None)
    try:
        yield
    finally:
        symm_mem.ops, symm_mem._local_reason = saved
        comm.symm_mem = False
