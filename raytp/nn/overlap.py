"""Linear layers that overlap their collectives with their GEMMs.

- :func:`linear_async_grad` (column-parallel, replicated input): the backward launches
  the all-reduce of the input gradient asynchronously and computes the weight
  gradient while it runs (Megatron-LM's async grad all-reduce).
- :func:`all_gather_linear` (column-parallel under sequence parallelism): the input
  is all-gathered along the sequence in chunks, and the GEMM of one chunk runs while
  the next chunk is gathered; the backward reduce-scatters the input gradient chunk
  by chunk in the same way.
- :func:`linear_reduce_scatter` (row-parallel under sequence parallelism): the GEMM
  runs chunk by chunk and each chunk's reduce-scatter overlaps the next GEMM; the
  backward all-gathers the output gradient chunk by chunk.

The sequence-parallel pair take their kernels from :class:`Chunked` (raytp's chunks
over any backend) or :class:`SymmMem` (torch's fused symmetric-memory ops, where the
group can run them).

On CUDA the collectives of torch.distributed run on NCCL's own stream and those of
the CuPy backend on raytp's communication stream; ``wait()`` orders the compute
stream after them, and a tensor in flight is never freed before (record_stream
inside the backends). The math equals the plain path exactly: the chunks only
reorder independent rows. Activations are (B, T, H) with the sequence on dim 1.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from raytp.comm.backend import Communicator
from raytp.comm.counter import backward_tag, current_tag
from raytp.comm.ops import _eager  # a graph break under torch.compile

SEQ_DIM = 1


def _chunks(rows: int, chunks: int) -> int:
    """The number of chunks that evenly divides ``rows`` (at most ``chunks``)."""
    while chunks > 1 and rows % chunks:
        chunks -= 1
    return max(chunks, 1)


def _weight_grad(grad_y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """(out, in) weight gradient of ``y = x W^T`` from (..., out) and (..., in)."""
    return grad_y.reshape(-1, grad_y.shape[-1]).t() @ x.reshape(-1, x.shape[-1])


def _bias_grad(grad_y: torch.Tensor) -> torch.Tensor:
    return grad_y.reshape(-1, grad_y.shape[-1]).sum(0)


def gathered_matmul(a: torch.Tensor, b: torch.Tensor, comm: Communicator, chunks: int):
    """All-gather ``a`` (B, T_r, K) along the sequence and multiply by ``b`` (K, N), chunk by
    chunk: returns ``(a_full @ b, a_full)``, (B, T_r * size, N) and (B, T_r * size, K)."""
    B, T_r, K = a.shape
    size, n = comm.size, _chunks(T_r, chunks)
    cs = T_r // n
    a_full = a.new_empty(B, size, n, cs, K)  # (B, rank, chunk, row, K) = (B, T, K) in order
    out = a.new_empty(B, size, n, cs, b.shape[1])
    buffers = [a.new_empty(size * B, cs, K) for _ in range(min(n, 2))]
    pieces = [a[:, j * cs:(j + 1) * cs].contiguous() for j in range(n)]
    work = comm.all_gather(buffers[0], pieces[0], async_op=True)
    for j in range(n):
        work.wait()
        gathered = buffers[j % 2].view(size, B, cs, K)
        if j + 1 < n:  # the next chunk's all-gather runs under this chunk's GEMM
            work = comm.all_gather(buffers[(j + 1) % 2], pieces[j + 1], async_op=True)
        a_full[:, :, j] = gathered.transpose(0, 1)
        out[:, :, j] = (gathered @ b).transpose(0, 1)
    T = size * T_r
    return out.view(B, T, -1), a_full.view(B, T, K)


def scattered_matmul(a: torch.Tensor, b: torch.Tensor, comm: Communicator, chunks: int) -> torch.Tensor:
    """``a`` (B, T, K) times ``b`` (K, N), reduce-scattered along the sequence, chunk by
    chunk: returns this rank's (B, T / size, N) of the sum over the group."""
    B, T, K = a.shape
    size = comm.size
    T_r = T // size
    n = _chunks(T_r, chunks)
    cs = T_r // n
    rows = a.view(B, size, n, cs, K)
    out = a.new_empty(B, T_r, b.shape[1])
    pending = []
    for j in range(n):
        # (size, B, cs, N): rank r's slab is the rows it will own
        partial = (rows[:, :, j] @ b).transpose(0, 1).contiguous()
        received = a.new_empty(B, cs, b.shape[1])
        pending.append((j, received, partial, comm.reduce_scatter(received, partial.view(size * B, cs, -1),
                                                                 async_op=True)))
        if len(pending) > 1:  # keep one reduce-scatter in flight under the next GEMM
            _finish_chunk(out, pending.pop(0), cs)
    for item in pending:
        _finish_chunk(out, item, cs)
    return out


def _finish_chunk(out, item, cs):
    j, received, _partial, work = item
    work.wait()
    out[:, j * cs:(j + 1) * cs] = received


class Chunked:
    """The sequence-parallel pairs cut into ``chunks`` pieces: one piece's collective runs
    under another's GEMM (:func:`gathered_matmul`, :func:`scattered_matmul`)."""

    def __init__(self, chunks: int):
        self.chunks = chunks

    def gather_matmul(self, a, b, comm: Communicator):
        """``(all_gather_seq(a) @ b, all_gather_seq(a))``."""
        return gathered_matmul(a, b, comm, self.chunks)

    def matmul_scatter(self, a, b, comm: Communicator):
        """``reduce_scatter_seq(a @ b)``."""
        return scattered_matmul(a, b, comm, self.chunks)


class SymmMem:
    """The sequence-parallel pairs as torch's fused symmetric-memory ops, pipelined by
    torch with copy-engine transfers (:mod:`raytp.comm.symm_mem`); the communicator
    must have them on (``enable_symm_mem``)."""

    def gather_matmul(self, a, b, comm: Communicator):
        a_full, out = comm.all_gather_matmul(a, b, SEQ_DIM)
        return out, a_full

    def matmul_scatter(self, a, b, comm: Communicator):
        return comm.matmul_reduce_scatter(a, b, SEQ_DIM)


class _LinearAsyncGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, comm):
        ctx.save_for_backward(x, weight)
        ctx.comm, ctx.has_bias, ctx.tag = comm, bias is not None, current_tag()
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_y):
        x, weight = ctx.saved_tensors
        grad_x = work = None
        if ctx.needs_input_grad[0]:
            grad_x = (grad_y @ weight).contiguous()
            with backward_tag(ctx):
                work = ctx.comm.all_reduce(grad_x, async_op=True)
        grad_w = _weight_grad(grad_y, x) if ctx.needs_input_grad[1] else None
        grad_b = _bias_grad(grad_y) if ctx.has_bias and ctx.needs_input_grad[2] else None
        if work is not None:
            work.wait()
        return grad_x, grad_w, grad_b, None


class _AllGatherLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, comm, kernels):
        y, x_full = kernels.gather_matmul(x, weight.t(), comm)
        ctx.save_for_backward(x_full, weight)
        ctx.comm, ctx.kernels, ctx.has_bias, ctx.tag = comm, kernels, bias is not None, current_tag()
        return y if bias is None else y + bias

    @staticmethod
    def backward(ctx, grad_y):
        x_full, weight = ctx.saved_tensors
        grad_y = grad_y.contiguous()
        grad_x = None
        if ctx.needs_input_grad[0]:
            with backward_tag(ctx):
                grad_x = ctx.kernels.matmul_scatter(grad_y, weight, ctx.comm)
        grad_w = _weight_grad(grad_y, x_full) if ctx.needs_input_grad[1] else None
        grad_b = _bias_grad(grad_y) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return grad_x, grad_w, grad_b, None, None


class _LinearReduceScatter(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, comm, kernels):
        ctx.save_for_backward(x, weight)
        ctx.comm, ctx.kernels, ctx.tag = comm, kernels, current_tag()
        return kernels.matmul_scatter(x.contiguous(), weight.t(), comm)

    @staticmethod
    def backward(ctx, grad_y):
        x, weight = ctx.saved_tensors
        with backward_tag(ctx):
            grad_x, grad_y_full = ctx.kernels.gather_matmul(grad_y.contiguous(), weight, ctx.comm)
        grad_w = _weight_grad(grad_y_full, x) if ctx.needs_input_grad[1] else None
        return grad_x, grad_w, None, None


def linear_async_grad(x, weight, bias, comm: Communicator) -> torch.Tensor:
    """``F.linear`` on a replicated input whose gradient is all-reduced over ``comm``,
    overlapped with the weight-gradient GEMM. Collectives: backward one all-reduce."""
    if comm.size == 1:
        return F.linear(x, weight, bias)
    return _eager(_LinearAsyncGrad, x, weight, bias, comm)


def all_gather_linear(x, weight, bias, comm: Communicator, kernels: Chunked | SymmMem) -> torch.Tensor:
    """``F.linear(all_gather_seq(x), weight, bias)`` with the gather overlapped by
    ``kernels``. (B, T / size, K) -> (B, T, N_r). Collectives: forward ``chunks``
    all-gathers (one fused one with :class:`SymmMem`); backward as many reduce-scatters."""
    if comm.size == 1:
        return F.linear(x, weight, bias)
    return _eager(_AllGatherLinear, x, weight, bias, comm, kernels)


def linear_reduce_scatter(x, weight, comm: Communicator, kernels: Chunked | SymmMem) -> torch.Tensor:
    """``reduce_scatter_seq(F.linear(x, weight))`` with the reduce-scatter overlapped by
    ``kernels``. (B, T, K_r) -> (B, T / size, N). Collectives: forward ``chunks``
    reduce-scatters (one fused one with :class:`SymmMem`); backward as many all-gathers."""
    if comm.size == 1:
        return F.linear(x, weight)
    return _eager(_LinearReduceScatter, x, weight, comm, kernels)
