"""Column- and row-parallel linear layers (Megatron-LM, section 3).

A column-parallel layer splits the weight's output rows over the TP group, so
each rank produces a slice of the output features and the forward pass needs no
communication. A row-parallel layer splits the input columns, so each rank
produces a partial sum that one all-reduce completes. Column then row is an MLP
with one all-reduce forward and one backward.

Each parameter is stored either sharded (this rank's slice only, the default) or
replicated (the whole parameter on every rank; the rank computes with its slice,
and the gradient, nonzero on that slice only, is summed over the TP group by
:func:`raytp.sync_grads` before the optimizer step).

With ``sequence_parallel=True`` the activations outside the layer pair are split
along the sequence (dim 1 of (B, T, H)): the column-parallel layer all-gathers its
input (reduce-scatter of the gradient) in place of the identity / all-reduce, and
the row-parallel layer reduce-scatters its output (all-gather of the gradient) in
place of the all-reduce (Korthikanti et al., 2022).

How a layer runs its GEMM and collectives is one kernel object, ``layer.kernel``
(:mod:`raytp.nn.kernels`), chosen at construction from the layer's family (its
constructor arguments) and replaced only by :func:`raytp.nn.set_overlap` and
:func:`raytp.nn.use_symm_mem`; forward makes one call to it.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from raytp.comm import ops
from raytp.comm.functional import check_divisible
from raytp.mesh import DeviceMesh
from raytp.nn import kernels
from raytp.params import ParamSpec, get_spec, materialize_, set_spec
from raytp.placement import Replicate, Shard, as_placement

SEQ_DIM = kernels.SEQ_DIM  # the sequence dim of (B, T, H) activations under sequence parallelism


class _TPLinear(nn.Module):
    """Parameters, their layout and initialization, and the kernel forward calls;
    subclasses add ``forward`` and their ``kernel_family``."""

    shard_dim: int  # the weight dim split over the TP group

    def __init__(self, in_features, out_features, mesh, bias, blocks, sequence_parallel, device, dtype):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.mesh = mesh
        self.sequence_parallel = sequence_parallel
        weight_shape = torch.Size((out_features, in_features))
        name = "out_features" if self.shard_dim == 0 else "in_features"
        self.blocks = _shard_blocks(blocks, weight_shape[self.shard_dim], mesh.tp_size, name)
        # the sharded layout of each parameter; a replicated one is sliced by it in forward
        self.weight_layout = self._layout(weight_shape, self.shard_dim, self.blocks)
        self.factory = {"device": device, "dtype": dtype}

    def _layout(self, shape, dim, blocks) -> ParamSpec:
        """Sharded on ``dim`` by ``blocks``; a block held by several ranks has a partial
        gradient on each, which :func:`raytp.sync_grads` sums over them."""
        tp = self.mesh.tp_size
        replicated = any(n < tp for _, n in blocks)
        return ParamSpec(Shard(dim), torch.Size(shape), tp, blocks,
                         grad_reduce=self.mesh.tp_comm if replicated else None)

    @property
    def local_block_sizes(self) -> list[int]:
        """The size of each block's slice on this rank, in the order of the local output."""
        return [size for size, _ in self.weight_layout.local_blocks()]

    def _register(self, name, shape, placement, allowed, layout=None, grad_reduce=None):
        """Create parameter ``name`` of global ``shape``: replicated, or sharded by ``layout``
        (built lazily: a size tp does not divide matters only when it is sharded)."""
        placement = as_placement(placement)
        if placement not in allowed:
            raise ValueError(f"{type(self).__name__}.{name}: placement {placement} is not one "
                             f"of {allowed}")
        if isinstance(placement, Replicate):
            spec = ParamSpec(Replicate(), torch.Size(shape), self.mesh.tp_size,
                             grad_reduce=grad_reduce)
            local_shape = shape
        else:
            spec = layout()
            local_shape = list(shape)
            local_shape[spec.placement.dim] = sum(size for size, _ in spec.local_blocks())
        param = nn.Parameter(torch.empty(local_shape, **self.factory))
        self.register_parameter(name, set_spec(param, spec))

    kernel: kernels.Kernel  # what forward computes with; replaced by set_overlap / use_symm_mem
    kernel_family: kernels.Family  # the kernels of this layer's math, fixed by the constructor

    # read-only descriptions of the kernel (the kernel is the one setting)
    @property
    def overlap(self) -> bool:
        return self.kernel.overlapped

    @property
    def overlap_chunks(self) -> int:
        return self.kernel.chunks

    @property
    def symm_mem(self) -> bool:
        return self.kernel.symm_mem

    def _finish_init(self):
        # overlap collectives with GEMMs on by default on GPU, off on CPU (set_overlap)
        self.kernel = self.kernel_family.choose(self.mesh.device.type == "cuda")
        del self.factory
        if self.weight.device.type != "meta":
            self.reset_parameters()

    def _sliced(self, param: torch.Tensor, layout: ParamSpec) -> torch.Tensor:
        """The part of ``param`` this rank computes with (differentiable)."""
        if isinstance(get_spec(param).placement, Replicate):
            return layout.shard(param, self.mesh.tp_rank)
        return param

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Initialize the full weight and bias, then keep this rank's part: with the same RNG
        state on every rank, tp=N holds exactly the shards of tp=1's weights. ``init_std``
        None is ``nn.Linear``'s initialization; a float draws the weight from
        normal(0, init_std) and zeros the bias (GPT-2's and BERT's)."""
        device, dtype = self.weight.device, self.weight.dtype
        weight = torch.empty(self.out_features, self.in_features, device=device, dtype=dtype)
        if self.init_std is not None:
            bias = None if self.bias is None else torch.zeros(self.out_features, device=device, dtype=dtype)
            self.load_full_(weight.normal_(0.0, self.init_std), bias)
            return
        nn.init.kaiming_uniform_(weight, a=math.sqrt(5))
        bias = None
        if self.bias is not None:
            bound = 1 / math.sqrt(self.in_features) if self.in_features > 0 else 0
            bias = nn.init.uniform_(torch.empty(self.out_features, device=device, dtype=dtype),
                                    -bound, bound)
        self.load_full_(weight, bias)

    @torch.no_grad()
    def load_full_(self, weight: torch.Tensor | None = None, bias: torch.Tensor | None = None):
        """Set the parameters from full (unsharded) tensors, keeping this rank's part."""
        for param, full in ((self.weight, weight), (self.bias, bias)):
            if full is None:
                continue
            spec = get_spec(param)
            if tuple(full.shape) != tuple(spec.global_shape):
                raise ValueError(f"full shape {tuple(full.shape)} != {tuple(spec.global_shape)}")
            param.copy_(spec.shard(full.to(param.device), self.mesh.tp_rank))
        return self

    @classmethod
    def from_linear(cls, linear: nn.Linear, mesh: DeviceMesh, **kwargs):
        """A TP layer holding this rank's part of ``linear``'s own weights."""
        layer = cls(linear.in_features, linear.out_features, mesh=mesh,
                    bias=linear.bias is not None, device="meta", dtype=linear.weight.dtype, **kwargs)
        materialize_(layer, linear.weight.device)
        return layer.load_full_(linear.weight, linear.bias)

    def extra_repr(self):
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"tp={self.mesh.tp_size}, bias={self.bias is not None}"
                + (", sequence_parallel=True" if self.sequence_parallel else ""))


def _shard_blocks(blocks, split: int, tp: int, name: str) -> tuple[tuple[int, int], ...]:
    """``blocks`` as ``(size, n_shards)`` pairs: a bare size is sharded ``tp`` ways."""
    blocks = tuple(blocks) if blocks else (split,)
    pairs = tuple(tuple(b) if isinstance(b, (tuple, list)) else (b, tp) for b in blocks)
    if sum(size for size, _ in pairs) != split:
        raise ValueError(f"blocks {blocks} must add up to {split}")
    for size, n_shards in pairs:
        if n_shards < 1 or tp % n_shards:
            raise ValueError(f"a {name} block sharded {n_shards} ways cannot map onto tp={tp}")
        what = name if len(pairs) == 1 else f"{name} block"
        if n_shards == tp:
            check_divisible(size, tp, what)
        elif size % n_shards:
            raise ValueError(f"{what}={size} is not divisible by its n_shards={n_shards}")
    return pairs


class ColumnParallelLinear(_TPLinear):
    """``y = x W^T + b`` with W's output rows split over the TP group.

    Input (..., in_features), replicated; or (B, T / tp, in_features), split along
    the sequence, with ``sequence_parallel``. Weight (out_features_per_rank,
    in_features) per rank. Output (..., out_features_per_rank), sharded on the last
    dim (all of T under sequence parallelism); or (..., out_features), replicated,
    with ``gather_output``.
    ``blocks`` cuts out_features into fused sub-blocks (gate and up, or Q, K and V),
    each sharded on its own, so the local output is [block 0 slice | block 1 slice | ...].
    A block is a size (sharded tp ways) or ``(size, n_shards)`` with ``n_shards``
    dividing tp: rank r then holds chunk ``r * n_shards // tp``, the block is
    replicated over ``tp // n_shards`` ranks, and :func:`raytp.sync_grads` sums its
    partial gradients over them.
    Weight and bias are stored ``Shard(0)`` (default) or ``Replicate()``.
    Collectives: forward none (an all-gather of the input under sequence parallelism,
    one more with ``gather_output``); backward one all-reduce of the input gradient
    (a reduce-scatter under sequence parallelism).
    """

    shard_dim = 0

    def __init__(self, in_features: int, out_features: int, *, mesh: DeviceMesh, bias: bool = True,
                 gather_output: bool = False, blocks=None, sequence_parallel: bool = False,
                 weight_placement=Shard(0), bias_placement=Shard(0), device=None, dtype=None,
                 init_std: float | None = None):
        super().__init__(in_features, out_features, mesh, bias, blocks, sequence_parallel, device, dtype)
        if gather_output and len(self.blocks) > 1:
            raise ValueError("gather_output would interleave fused blocks; gather each block instead")
        self.gather_output = gather_output
        allowed = (Shard(0), Replicate())
        self._register("weight", (out_features, in_features), weight_placement, allowed,
                       lambda: self.weight_layout, mesh.tp_comm)
        if bias:
            self.bias_layout = self._layout((out_features,), 0, self.blocks)
            self._register("bias", (out_features,), bias_placement, allowed,
                           lambda: self.bias_layout, mesh.tp_comm)
        else:
            self.register_parameter("bias", None)
        self.init_std = init_std
        self._finish_init()

    @property
    def out_features_per_rank(self) -> int:
        return sum(self.local_block_sizes)

    @property
    def kernel_family(self) -> kernels.Family:
        return kernels.COLUMN_SP if self.sequence_parallel else kernels.COLUMN

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tp = self.mesh.tp_comm
        weight = self._sliced(self.weight, self.weight_layout)
        bias = None if self.bias is None else self._sliced(self.bias, self.bias_layout)
        y = self.kernel(x, weight, bias, tp)
        return ops.gather_from(y, tp, -1) if self.gather_output else y


class RowParallelLinear(_TPLinear):
    """``y = x W^T + b`` with W's input columns split over the TP group.

    Input (..., in_features_per_rank), sharded on the last dim; or (..., in_features),
    replicated, with ``input_is_parallel=False`` (sliced here). Weight
    (out_features, in_features_per_rank) per rank, stored ``Shard(1)`` (default) or
    ``Replicate()``. Output (..., out_features), replicated, the bias added once
    after the reduction; the bias is stored ``Replicate()`` (default) or ``Shard(0)``
    (gathered in forward). With ``reduce_output=False`` the output is left a partial
    sum (Partial) for the caller to reduce, fused or later; the bias is then added on
    TP rank 0 only, so that the sum is still right. With ``sequence_parallel`` the
    input is (B, T, in_features_per_rank) and the output (B, T / tp, out_features),
    split along the sequence; the bias then needs ``Replicate()`` and its gradient,
    a partial sum over the sequence chunks, is summed by :func:`raytp.sync_grads`.
    Collectives: forward one all-reduce (a reduce-scatter under sequence parallelism,
    none with ``reduce_output=False``, one all-gather more for a sharded bias);
    backward none (an all-gather of the gradient under sequence parallelism, one
    with ``input_is_parallel=False``).
    """

    shard_dim = 1

    def __init__(self, in_features: int, out_features: int, *, mesh: DeviceMesh, bias: bool = True,
                 input_is_parallel: bool = True, reduce_output: bool = True,
                 sequence_parallel: bool = False, weight_placement=Shard(1),
                 bias_placement=Replicate(), device=None, dtype=None, init_std: float | None = None):
        super().__init__(in_features, out_features, mesh, bias, None, sequence_parallel, device, dtype)
        self.input_is_parallel, self.reduce_output = input_is_parallel, reduce_output
        if sequence_parallel and not reduce_output:
            raise ValueError("RowParallelLinear: sequence_parallel reduce-scatters the output; "
                             "it cannot be combined with reduce_output=False")
        self._register("weight", (out_features, in_features), weight_placement,
                       (Shard(1), Replicate()), lambda: self.weight_layout, mesh.tp_comm)
        if bias:
            if (sequence_parallel or not reduce_output) and as_placement(bias_placement) != Replicate():
                option = "sequence_parallel=True" if sequence_parallel else "reduce_output=False"
                raise ValueError(f"RowParallelLinear: {option} needs a Replicate() bias")
            # A bias added to a partial output (rank 0 only) or to a sequence chunk has a
            # partial gradient on each rank.
            partial = sequence_parallel or not reduce_output
            self._register("bias", (out_features,), bias_placement, (Replicate(), Shard(0)),
                           lambda: self._layout((out_features,), 0, ((out_features, mesh.tp_size),)),
                           mesh.tp_comm if partial else None)
        else:
            self.register_parameter("bias", None)
        self.init_std = init_std
        self._finish_init()

    @property
    def in_features_per_rank(self) -> int:
        return self.in_features // self.mesh.tp_size

    @property
    def kernel_family(self) -> kernels.Family:
        if self.sequence_parallel:
            return kernels.ROW_SP
        return kernels.ROW if self.reduce_output else kernels.ROW_PARTIAL

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tp = self.mesh.tp_comm
        if not self.input_is_parallel:
            x = ops.scatter_to(x, tp, -1)
        weight = self._sliced(self.weight, self.weight_layout)
        return self.kernel(x, weight, self._full_bias(), tp)

    def _full_bias(self) -> torch.Tensor | None:
        """The (out_features,) bias, all-gathered where it is stored sharded."""
        if self.bias is None or not isinstance(get_spec(self.bias).placement, Shard):
            return self.bias
        return ops.gather_from(self.bias, self.mesh.tp_comm, 0)

