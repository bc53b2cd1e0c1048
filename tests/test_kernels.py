"""The kernel objects of the TP linear layers (raytp.nn.kernels): each one, put in a
layer, equals nn.Linear on one process (forward, input and weight gradients, a step)
with its own collectives; forward makes one call to the layer's kernel; the overlap
settings replace that object and leave no flags on the layer."""

from contextlib import nullcontext

import pytest
import torch
from torch import nn

from raytp.nn import ColumnParallelLinear, RowParallelLinear, kernels, set_overlap, use_symm_mem

import _dist
from helpers import check_parity, chunk, decomposed_symm_mem, mesh, randn, world

K = kernels
# (kind, sequence_parallel, kernel, forward counts, backward counts) at tp > 1
CASES = [
    ("column", False, K.CopyTo, {}, {"all_reduce": 1}),
    ("column", False, K.AsyncInputGrad, {}, {"all_reduce": 1}),
    ("column", True, K.AllGather, {"all_gather": 1}, {"reduce_scatter": 1}),
    ("column", True, lambda: K.ChunkedAllGather(3), {"all_gather": 3}, {"reduce_scatter": 3}),
    ("column", True, K.SymmMemAllGather, {"all_gather": 1}, {"reduce_scatter": 1}),
    ("row", False, K.AllReduce, {"all_reduce": 1}, {}),
    ("row", True, K.ReduceScatter, {"reduce_scatter": 1}, {"all_gather": 1}),
    ("row", True, lambda: K.ChunkedReduceScatter(3), {"reduce_scatter": 3}, {"all_gather": 3}),
    ("row", True, K.SymmMemReduceScatter, {"reduce_scatter": 1}, {"all_gather": 1}),
]


def _layer(kind, sp, n, bias=True):
    torch.manual_seed(0)
    if kind == "column":  # (B, T[/tp], 6) -> (B, T, 4n / tp)
        ref = nn.Linear(6, 4 * n, bias=bias, dtype=torch.float64)
        layer = ColumnParallelLinear.from_linear(ref, mesh(n), sequence_parallel=sp)
        local_in, local_out = (lambda x: chunk(x, 1)) if sp else (lambda x: x), (lambda y: chunk(y, -1))
    else:  # (B, T, 4n / tp) -> (B, T[/tp], 6)
        ref = nn.Linear(4 * n, 6, bias=bias, dtype=torch.float64)
        layer = RowParallelLinear.from_linear(ref, mesh(n), sequence_parallel=sp)
        local_in, local_out = (lambda x: chunk(x, -1)), (lambda y: chunk(y, 1)) if sp else (lambda y: y)
    return layer, ref, local_in, local_out


def _check_kernel(case):
    kind, sp, make, _, _ = CASES[case]
    rank, n = world()
    layer, ref, local_in, local_out = _layer(kind, sp, n)
    layer.kernel = make()
    x = randn(2, 6 * n, ref.in_features, seed=1)  # T = 6n: 3 chunks of each rank's rows
    with decomposed_symm_mem(layer.mesh.tp_comm) if layer.kernel.symm_mem else nullcontext():
        if layer.kernel.symm_mem:
            assert layer.mesh.tp_comm.enable_symm_mem() is None
        return check_parity(layer, ref, x, local_in=local_in, local_out=local_out)


@pytest.mark.parametrize("n", [1, 2])
@pytest.mark.parametrize("case", range(len(CASES)),
                         ids=[f"{c[0]}-{'sp' if c[1] else 'tp'}-{i}" for i, c in enumerate(CASES)])
def test_each_kernel_matches_one_device(n, case):
    fwd, bwd = _dist.run(n, _check_kernel, case)[0]
    expected = ({}, {}) if n == 1 else CASES[case][3:]
    assert (fwd, bwd) == expected


class Spy(kernels.Kernel):
    """Records its calls and answers with a marker tensor."""

    def __init__(self):
        self.calls = []

    def __call__(self, x, weight, bias, comm):
        self.calls.append((x, weight, bias, comm))
        return torch.full((1,), 7.0)


def _check_forward_calls_the_kernel(kind, sp):
    layer, _, _, _ = _layer(kind, sp, world()[1])
    layer.kernel = spy = Spy()
    x = torch.zeros(1)
    y = layer(x)
    [(x_in, weight, bias, comm)] = spy.calls
    return (y.tolist(), x_in is x, weight is layer.weight, bias is layer.bias,
            comm is layer.mesh.tp_comm)


@pytest.mark.parametrize("kind", ["column", "row"])
@pytest.mark.parametrize("sp", [False, True], ids=["tp", "sp"])
def test_forward_makes_one_call_to_the_kernel(kind, sp):
    for result in _dist.run(2, _check_forward_calls_the_kernel, kind, sp):
        assert result == ([7.0], True, True, True, True)


def _kernels(module):
    return [repr(layer.kernel) for layer in module]


def _check_settings_replace_kernels():
    m = mesh(2)
    layers = nn.ModuleList([ColumnParallelLinear(4, 4, mesh=m), ColumnParallelLinear(4, 4, mesh=m,
                            sequence_parallel=True), RowParallelLinear(4, 4, mesh=m),
                            RowParallelLinear(4, 4, mesh=m, reduce_output=False),
                            RowParallelLinear(4, 4, mesh=m, sequence_parallel=True)])
    seen = {"default": _kernels(layers)}
    before = [layer.kernel for layer in layers]
    seen["on, 4 chunks"] = _kernels(set_overlap(layers, True, chunks=4))
    replaced = [a is not layer.kernel for a, layer in zip(before, layers, strict=True)]
    seen["on, chunks kept"] = _kernels(set_overlap(layers, True))
    seen["off"] = _kernels(set_overlap(layers, False))
    assert use_symm_mem(layers) is not None  # gloo on CPU: the chunked fallback
    seen["symm_mem fallback"] = _kernels(layers)
    flags = {}
    for name, value in (("overlap", True), ("overlap_chunks", 4), ("symm_mem", True)):
        try:
            setattr(layers[1], name, value)
            flags[name] = "set"
        except AttributeError:
            flags[name] = "read-only"
    return seen, replaced, flags, [vars(layer).keys() & flags.keys() for layer in layers]


def test_overlap_settings_replace_the_kernel_object():
    seen, replaced, flags, stored = _dist.run(2, _check_settings_replace_kernels)[0]
    assert seen == {
        "default": ["CopyTo()", "AllGather()", "AllReduce()", "NoReduce()", "ReduceScatter()"],
        "on, 4 chunks": ["AsyncInputGrad()", "ChunkedAllGather(4)", "AllReduce()", "NoReduce()",
                         "ChunkedReduceScatter(4)"],
        "on, chunks kept": ["AsyncInputGrad()", "ChunkedAllGather(4)", "AllReduce()", "NoReduce()",
                            "ChunkedReduceScatter(4)"],
        "off": ["CopyTo()", "AllGather()", "AllReduce()", "NoReduce()", "ReduceScatter()"],
        "symm_mem fallback": ["CopyTo()", "ChunkedAllGather(2)", "AllReduce()", "NoReduce()",
                              "ChunkedReduceScatter(2)"],
    }
    assert replaced == [True] * 5
    # no mutable flags left: what the layer reports is read from its kernel
    assert flags == {"overlap": "read-only", "overlap_chunks": "read-only", "symm_mem": "read-only"}
    assert stored == [set()] * 5


def test_family_choose():
    assert [repr(K.COLUMN.choose(s, 4)) for s in (False, True, "symm_mem")] == [
        "CopyTo()", "AsyncInputGrad()", "AsyncInputGrad()"]
    assert [repr(K.COLUMN_SP.choose(s, c)) for s, c in ((True, 1), (True, 2), ("symm_mem", 2))] == [
        "AllGather()", "ChunkedAllGather(2)", "SymmMemAllGather()"]
    assert [repr(K.ROW_SP.choose(s, c)) for s, c in ((False, 4), (True, 3), ("symm_mem", 1))] == [
        "ReduceScatter()", "ChunkedReduceScatter(3)", "SymmMemReduceScatter()"]
    with pytest.raises(ValueError, match=r"overlap='fast' must be one of \(False, True, 'symm_mem'\)"):
        K.COLUMN.choose("fast")
    for bad in (0, 1.5):
        with pytest.raises(ValueError, match=f"chunks={bad} must be a positive integer"):
            K.ChunkedReduceScatter(bad)


def _check_decoding_kernels():
    """KV-cache decoding runs the layers without sequence parallelism: non-SP kernels
    inside, the tuned ones back after; the logits equal a full forward's."""
    from raytp.models import GPTConfig
    from raytp.models.gpt import sequence_parallel_off

    config = GPTConfig(vocab_size=37, n_layers=1, d_model=16, d_ff=32, max_seq_len=8, n_heads=2,
                       dtype="float64", sequence_parallel=True)
    torch.manual_seed(0)
    model = set_overlap(config.build(mesh(2)).eval(), True, chunks=2)
    ids = torch.randint(0, 37, (2, 8), generator=torch.Generator().manual_seed(1))
    full = model(ids)
    block = model.layers[0]
    layers = [block.attn.qkv, block.attn.proj, block.mlp.fc_in, block.mlp.fc_out]
    with sequence_parallel_off(model):
        inside = _kernels(layers)
    cache = model.new_kv_cache()
    parts = [model(ids[:, :4], kv_cache=cache)]
    parts += [model(ids[:, t:t + 1], kv_cache=cache) for t in range(4, 8)]
    torch.testing.assert_close(torch.cat(parts, 1), full, rtol=1e-10, atol=1e-10)
    return inside, _kernels(layers)


def test_decoding_swaps_kernels_and_restores_them():
    inside, after = _dist.run(2, _check_decoding_kernels)[0]
    assert inside == ["AsyncInputGrad()", "AllReduce()", "AsyncInputGrad()", "AllReduce()"]
    assert after == ["ChunkedAllGather(2)", "ChunkedReduceScatter(2)"] * 2
