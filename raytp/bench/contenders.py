"""The contenders of ``raytp bench``, each built on one rank for one workload.

- ``one-gpu``: the plain PyTorch model (:mod:`raytp.bench.reference`) on TP rank 0
  alone; the other ranks wait.
- ``torch-tp``: the same plain model parallelized by PyTorch
  (``torch.distributed.tensor.parallel.parallelize_module``, torchtitan's plan, with
  ``SequenceParallel`` for the SP blocks and ``loss_parallel`` for the GPT) on the TP
  group as a torch ``DeviceMesh``.
- ``raytp``: raytp's layers (``ParallelMLP``, ``Block``, ``GPT``) holding this rank's
  part of the same weights, on the torch.distributed (NCCL / gloo) communicators.
- ``raytp-overlap``: the same with communication overlapped with compute.
- ``raytp-cupy``: raytp (with overlap, where raytp has it) on CuPy NCCL communicators.
- ``raytp-symm-mem``: raytp with overlap, the sequence-parallel pairs through torch's
  fused symmetric-memory ops (SP workloads only; skipped where the GPUs cannot run them).

A step is what is timed: forward and backward against a fixed output gradient for the
MLP and block (the input needs its gradient, as in the middle of a model, so the
input-gradient collective runs); forward, cross-entropy, backward and an AdamW step
(``foreach``, lr 1e-4) for the GPT. Every contender starts from the same weights (the
plain model drawn from one seed) and the same inputs.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
from torch import nn

import raytp.nn
from raytp.bench import convert, reference
from raytp.bench.convert import Skip
from raytp.bench.nullcomm import null_mesh
from raytp.bench.workloads import BlockWorkload, GPTWorkload, MLPWorkload, Workload
from raytp.comm import functional as cf
from raytp.mesh import DeviceMesh
from raytp.nn.rotary import rope_tables
from raytp.optim import sync_grads

CONTENDERS = ("one-gpu", "torch-tp", "raytp", "raytp-overlap", "raytp-cupy", "raytp-symm-mem")
RAYTP = ("raytp", "raytp-overlap", "raytp-cupy", "raytp-symm-mem")
# raytp with no collectives (exposed communication = contender - this), by overlap setting
NO_COMM = {False: "raytp-no-comm", True: "raytp-overlap-no-comm"}


@dataclass
class RankContext:
    """What every contender on this rank shares: the mesh, dtype, seed, and the CuPy
    mesh (made once, on first use)."""

    mesh: DeviceMesh
    dtype: torch.dtype
    seed: int = 0
    _cupy: DeviceMesh | None = field(default=None, repr=False)

    @property
    def device(self) -> torch.device:
        return self.mesh.device

    def cupy_mesh(self) -> DeviceMesh:
        if self.device.type != "cuda":
            raise Skip("the CuPy NCCL backend needs CUDA")
        try:
            import cupy  # noqa: F401

            from raytp.comm import cupy_backend
        except ImportError as e:
            raise Skip(f"no CuPy: {e}") from None
        make = getattr(cupy_backend, "make_cupy_mesh", None)
        if make is None:
            raise Skip("raytp.comm.cupy_backend.make_cupy_mesh is not there yet")
        if self._cupy is None:
            self._cupy = make(self.mesh)
        return self._cupy

    def close(self) -> None:
        if self._cupy is not None:
            for comm in (self._cupy.tp_comm, self._cupy.dp_comm):
                if hasattr(comm, "close"):
                    comm.close()
            self._cupy = None


@dataclass
class Instance:
    """One contender built on this rank: ``step()`` is timed; ``forward()`` returns the
    full output and the loss (no gradients), for checking that contenders agree."""

    name: str
    step: Callable[[], object]
    forward: Callable[[], tuple[torch.Tensor, torch.Tensor]]
    module: nn.Module
    optimizer: torch.optim.Optimizer | None = None
    overlap: bool | None = None
    mesh: DeviceMesh | None = None  # the raytp mesh, where collectives are counted


def is_null(name: str) -> bool:
    return name in NO_COMM.values()


def overlap_of(name: str) -> bool:
    """The overlap setting of a raytp contender (CuPy and symmetric memory run with overlap)."""
    return name in ("raytp-overlap", "raytp-cupy", "raytp-symm-mem", NO_COMM[True])


def make_inputs(w: Workload, device: torch.device, dtype: torch.dtype, seed: int) -> dict:
    """The same inputs on every rank: (1, T, d) activations and output gradients, or ids."""
    gen = torch.Generator(device=device).manual_seed(seed + 1)
    if isinstance(w, GPTWorkload):
        shape = (w.batch, w.seq_len)
        ids, labels = (torch.randint(0, w.vocab_size, shape, generator=gen, device=device) for _ in "ab")
        return {"ids": ids, "labels": labels}
    d = w.hidden if isinstance(w, MLPWorkload) else w.d_model
    x, grad = (torch.randn(1, w.tokens, d, generator=gen, device=device, dtype=dtype) for _ in "ab")
    out = {"x": x, "grad": grad}
    if isinstance(w, BlockWorkload):
        out["rope"] = rope_tables(w.head_dim, w.tokens, w.rope_theta, device=device, dtype=dtype)
    return out


def build(name: str, w: Workload, ctx: RankContext, inputs: dict) -> Instance:
    """Contender ``name`` for workload ``w`` on this rank; :class:`Skip` when a prerequisite
    is missing. Collective over the TP group for every contender but ``one-gpu``."""
    if name not in CONTENDERS and not is_null(name):
        raise ValueError(f"unknown contender {name!r}; choose from {CONTENDERS}")
    mesh = ctx.cupy_mesh() if name == "raytp-cupy" else null_mesh(ctx.mesh) if is_null(name) else ctx.mesh
    torch.manual_seed(ctx.seed)  # the same full weights on every rank and for every contender
    ref = _reference(w, ctx.device, ctx.dtype)
    if name == "one-gpu":
        return _plain(name, ref, w, inputs, mesh, sharded=False)
    if name == "torch-tp":
        return _torch_tp(ref, w, inputs, mesh)
    return _raytp(name, ref, w, inputs, mesh, overlap_of(name), ctx.seed)


def _reference(w: Workload, device, dtype) -> nn.Module:
    factory = {"device": device, "dtype": dtype}
    if isinstance(w, MLPWorkload):
        return reference.MLP(w.hidden, w.ffn, **factory)
    if isinstance(w, BlockWorkload):
        return reference.Block(w.d_model, w.n_heads, w.n_kv_heads, w.ffn, eps=w.norm_eps, **factory)
    return reference.GPT(w.vocab_size, w.d_model, w.n_layers, w.n_heads, w.n_kv_heads, w.ffn, w.seq_len,
                         rope_theta=w.rope_theta, eps=w.norm_eps, **factory)


def _torch_tp(ref, w, inputs, mesh) -> Instance:
    torch_mesh = mesh.torch_mesh()
    if isinstance(w, MLPWorkload):
        reference.torch_tp_mlp(ref, torch_mesh)
    elif isinstance(w, BlockWorkload):
        reference.torch_tp_block(ref, torch_mesh, w.sequence_parallel)
    else:
        reference.torch_tp_gpt(ref, torch_mesh)
    return _plain("torch-tp", ref, w, inputs, mesh, sharded=True)


def _raytp(name, ref, w, inputs, mesh, overlap, seed) -> Instance:
    sp = isinstance(w, BlockWorkload) and w.sequence_parallel
    if name == "raytp-symm-mem" and not sp:
        raise Skip("the symmetric-memory ops serve sequence parallelism; this workload has none")
    if isinstance(w, MLPWorkload):
        model = convert.raytp_mlp(ref, w, mesh, overlap)
    elif isinstance(w, BlockWorkload):
        model = convert.raytp_block(ref, w, mesh, overlap, seed)
    else:
        model = convert.raytp_gpt(ref, w, mesh, overlap)
    if name == "raytp-symm-mem" and (reason := raytp.nn.use_symm_mem(model)) is not None:
        raise Skip(f"symmetric-memory ops unavailable: {reason}")
    if isinstance(w, GPTWorkload):
        batch = {"input_ids": inputs["ids"], "labels": inputs["labels"]}

        def logits():
            return cf.all_gather(model(inputs["ids"]), mesh.tp_comm, -1)[..., :w.vocab_size]

        @torch.no_grad()
        def check():
            return logits(), model.loss(batch)

        opt = _adamw(model)
        step = _train_step(lambda: model.loss(batch), opt, after_backward=lambda: sync_grads(model, mesh))
        return Instance(name, step, check, model, opt, overlap, mesh)
    return _activation_instance(name, model, w, inputs, mesh, sp, overlap=overlap, mesh=mesh)


def _plain(name, model, w, inputs, mesh, sharded: bool) -> Instance:
    """The reference model as it is (one GPU) or parallelized by PyTorch (``sharded``)."""
    if isinstance(w, GPTWorkload):
        from torch.distributed.tensor.parallel import loss_parallel

        parallel_loss = loss_parallel if sharded else nullcontext
        ids, labels = inputs["ids"], inputs["labels"]

        @torch.no_grad()
        def check():
            logits = model(ids)
            with parallel_loss():
                loss = reference.cross_entropy(logits, labels)
            return _full(logits), _full(loss)

        opt = _adamw(model)
        step = _train_step(lambda: reference.cross_entropy(model(ids), labels), opt, context=parallel_loss)
        return Instance(name, step, check, model, opt)
    sp = sharded and isinstance(w, BlockWorkload) and w.sequence_parallel
    return _activation_instance(name, model, w, inputs, mesh, sp)


def _activation_instance(name, model, w, inputs, group_mesh, sp: bool, **extra) -> Instance:
    """An MLP or block contender. Its own leaf input and output gradient are the whole
    (1, T, d) tensors, or this rank's (1, T / tp, d) chunks under sequence parallelism;
    ``forward()`` gathers the chunks of the output."""
    x, grad = inputs["x"], inputs["grad"]
    if sp:
        x, grad = (cf.local_chunk(t, group_mesh.tp_comm, 1) for t in (x, grad))
    x = x.detach().clone().requires_grad_(True)
    rope = inputs.get("rope")
    fn = model if rope is None else (lambda t: model(t, rope))

    def full_output():
        out = fn(x)
        return cf.all_gather(out, group_mesh.tp_comm, 1) if sp else out

    return Instance(name, _fwd_bwd_step(fn, x, grad, model), _with_loss(full_output), model, **extra)


def _fwd_bwd_step(fn, x, grad, model):
    def step():
        x.grad = None
        model.zero_grad(set_to_none=True)
        fn(x).backward(grad)

    return step


def _train_step(loss_fn, opt, *, after_backward=None, context=nullcontext):
    def step():
        with context():
            loss = loss_fn()
            loss.backward()
        if after_backward is not None:
            after_backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def _with_loss(full_output):
    def check():
        with torch.no_grad():
            out = full_output()
            return out, out.float().pow(2).mean()

    return check


def _adamw(model: nn.Module) -> torch.optim.Optimizer:
    """AdamW, foreach. Under PyTorch TP the parameters left plain (the norms) get their own
    group: one foreach call cannot mix torch DTensors and plain tensors."""
    params = list(model.parameters())
    dtensor = [p for p in params if hasattr(p, "placements")]
    groups = [dtensor, [p for p in params if not hasattr(p, "placements")]]
    return torch.optim.AdamW([{"params": g} for g in groups if g], lr=1e-4, foreach=True)


def _full(t: torch.Tensor) -> torch.Tensor:
    """A torch DTensor as the whole tensor; a plain tensor as it is."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t
