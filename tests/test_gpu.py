"""GPU tests, run on the GPU host (`pytest -m gpu`): NCCL through torch.distributed and
through CuPy, overlap on and off, torch's symmetric-memory ops, memory over a long run,
and TPCluster on GPUs.

Backends: ``torch`` and ``cupy-nccl`` put one rank on each of 2 GPUs (NCCL refuses two
ranks on one GPU); ``gloo-shared-gpu`` puts 2 ranks on one GPU over gloo, whose CUDA
collectives run on streams of their own, so the overlap paths' stream ordering is
checked on a host with a single GPU too."""

import functools

import numpy as np
import pytest
import torch

import _dist
from helpers import mesh, world

TWO_GPUS = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")]

BACKENDS = [pytest.param("torch", marks=TWO_GPUS), pytest.param("cupy-nccl", marks=TWO_GPUS),
            "gloo-shared-gpu"]
WORLD_BACKEND = {"torch": "nccl", "cupy-nccl": "nccl", "gloo-shared-gpu": "gloo-cuda"}


@functools.cache
def _cupy_mesh(tp, dp):
    from raytp.comm.cupy_backend import make_cupy_mesh

    return make_cupy_mesh(mesh(tp, dp))


@functools.cache
def _gloo_cuda_mesh(tp, dp):
    import raytp

    return raytp.DeviceMesh(tp=tp, dp=dp, device=torch.device("cuda", torch.cuda.current_device()))


def _mesh(backend, tp, dp=1):
    return {"torch": mesh, "cupy-nccl": _cupy_mesh, "gloo-shared-gpu": _gloo_cuda_mesh}[backend](tp, dp)


def _run(backend, fn, *args):
    return _dist.run(2, fn, backend, *args, backend=WORLD_BACKEND[backend])


def _set_overlap(model, overlap):
    """``overlap``: False, True, or "symm_mem" (torch's fused ops, which must run here)."""
    from raytp.nn.kernels import apply_overlap

    assert apply_overlap(model, overlap) is None


def _config(**kw):
    from raytp.models import GPTConfig

    base = dict(vocab_size=250, n_layers=2, n_heads=8, n_kv_heads=2, d_model=128, d_ff=256,
                max_seq_len=64, norm="rmsnorm", activation="swiglu", positions="rope", bias=False,
                tie_embeddings=False, dtype="float32")
    return GPTConfig(**{**base, **kw})


def _train(model, mesh_, steps, seed=0):
    import raytp

    opt = raytp.AdamW(lr=1e-3).build(model.parameters())
    g = torch.Generator().manual_seed(seed)
    losses = []
    for _ in range(steps):
        ids = torch.randint(0, model.config.vocab_size, (4, 64), generator=g).to(mesh_.device)
        loss = model.loss({"input_ids": ids})
        loss.backward()
        raytp.sync_grads(model, mesh_)
        raytp.clip_grad_norm_(model.parameters(), 1.0, mesh_)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def _check_gpt_parity(backend, sp, overlap):
    """tp=2 over ``backend`` equals tp=1 (both ranks hold the whole model) for 10 steps."""
    rank, n = world()
    losses = {}
    for tp in (1, 2):
        m = _mesh(backend, tp, n // tp)
        torch.manual_seed(0)
        model = _config(sequence_parallel=sp and tp > 1).build(m)
        _set_overlap(model, overlap)
        losses[tp] = _train(model, m, 10)
    np.testing.assert_allclose(losses[2], losses[1], rtol=2e-5)
    return losses[2]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("sp", [False, True], ids=["tp", "sp"])
@pytest.mark.parametrize("overlap", [False, True], ids=["plain", "overlap"])
def test_gpt_tp2_matches_tp1(backend, sp, overlap):
    _run(backend, _check_gpt_parity, sp, overlap)


@TWO_GPUS
def test_gpt_tp2_matches_tp1_with_symm_mem():
    _run("torch", _check_gpt_parity, True, "symm_mem")


def _check_overlap_agrees(backend, sp, mode):
    """The bf16 MLP block at hidden 4096 without overlap and with ``mode``: the same
    output and gradients."""
    import raytp
    from raytp.nn import ParallelMLP

    rank, n = world()
    m = _mesh(backend, n)
    results = []
    for setting in ("off", mode):
        torch.manual_seed(0)
        mlp = ParallelMLP(4096, 16384, mesh=m, bias=False, sequence_parallel=sp, dtype=torch.bfloat16,
                          device=m.device)
        raytp.nn.set_overlap(mlp, setting != "off", chunks=4 if setting == "chunks" else 1)
        if setting == "symm_mem":
            assert raytp.nn.use_symm_mem(mlp) is None
            assert mlp.fc_in.symm_mem and mlp.fc_out.symm_mem
        g = torch.Generator(device=m.device).manual_seed(1)
        x = torch.randn(1, 4096, 4096, device=m.device, dtype=torch.bfloat16, generator=g)
        x = (x.chunk(n, 1)[rank] if sp else x).clone().requires_grad_()
        y = mlp(x)
        y.float().pow(2).mean().backward()
        results.append([y.detach().float(), x.grad.float()] + [p.grad.float() for p in mlp.parameters()])
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("sp,mode", [(False, "overlap"), (True, "overlap"), (True, "chunks")],
                         ids=["tp", "sp", "sp-chunks"])
def test_overlap_on_and_off_agree(backend, sp, mode):
    _run(backend, _check_overlap_agrees, sp, mode)


@TWO_GPUS
def test_symm_mem_and_plain_agree():
    _run("torch", _check_overlap_agrees, True, "symm_mem")


def _check_symm_mem_ops():
    """On a one-rank NCCL group: the probe passes and torch's fused ops, reached through
    the communicator, give the all-gather / reduce-scatter of one rank (the identity)
    around the GEMM. Checks the ops' signatures on this host's torch."""
    m = mesh(1)
    assert m.tp_comm.enable_symm_mem() is None
    g = torch.Generator(device=m.device).manual_seed(0)
    a = torch.randn(2, 64, 128, device=m.device, dtype=torch.bfloat16, generator=g)
    b = torch.randn(128, 96, device=m.device, dtype=torch.bfloat16, generator=g)
    a_full, y = m.tp_comm.all_gather_matmul(a, b, 1)
    torch.testing.assert_close(a_full, a)
    torch.testing.assert_close(y, a @ b)
    torch.testing.assert_close(m.tp_comm.matmul_reduce_scatter(a, b, 1), a @ b)


def test_symm_mem_ops_on_one_gpu():
    _dist.run(1, _check_symm_mem_ops, backend="nccl")


def _check_memory_flat(backend):
    """Peak allocated memory of a bf16 training step does not grow over 100 steps."""
    import raytp

    m = _mesh(backend, 2)
    torch.manual_seed(0)
    model = _config(dtype="bfloat16", d_model=512, d_ff=2048, n_layers=4, sequence_parallel=True).build(m)
    opt = raytp.AdamW(lr=1e-4).build(model.parameters())
    peaks = []
    for _step in range(100):
        torch.cuda.reset_peak_memory_stats()
        ids = torch.randint(0, 250, (8, 64), device=m.device)
        model.loss({"input_ids": ids}).backward()
        raytp.sync_grads(model, m)
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        peaks.append(torch.cuda.max_memory_allocated())
    assert max(peaks[10:]) <= peaks[10] * 1.01 + 2**20, (peaks[10], max(peaks[10:]))
    return peaks[10], peaks[-1], torch.cuda.memory_allocated()


@pytest.mark.parametrize("backend", BACKENDS)
def test_peak_memory_does_not_grow_over_100_steps(backend):
    _run(backend, _check_memory_flat)


@TWO_GPUS
def test_tpcluster_backends_agree_on_gpus():
    """Ray GPU actors, one GPU each: the demo model over torch.distributed NCCL and over
    CuPy NCCL gives the same losses, and learns."""
    import ray

    import raytp
    from raytp.driver.demo import PLAN, DigitsMLP, batches, load_digits

    train, test = load_digits()
    ray.init(num_gpus=2, include_dashboard=False, ignore_reinit_error=True)
    losses, accuracy = {}, {}
    try:
        for backend in ("torch", "cupy-nccl"):
            with raytp.TPCluster(tp=2, device="cuda", backend=backend) as cluster:
                cluster.build(DigitsMLP, plan=PLAN, optimizer=raytp.AdamW(lr=2e-3), seed=0)
                history = cluster.fit(batches(train, 128, 8), progress=False)
                accuracy[backend] = cluster.evaluate(test)["accuracy"]
                rows = cluster.metrics()
            losses[backend] = [h["loss"] for h in history]
            assert all(r["peak_mem_bytes"] > 0 for r in rows)
    finally:
        ray.shutdown()
    assert min(accuracy.values()) > 0.95, accuracy
    np.testing.assert_allclose(losses["cupy-nccl"], losses["torch"], rtol=1e-4)


@TWO_GPUS
def test_stopped_rank_on_nccl_is_named_and_recovered(tmp_path):
    """A rank stopped (SIGSTOP) in the forward on NCCL: named at the phase deadline, the
    communicators aborted, the actors ended, and the run recovered with the same losses."""
    import ray
    import test_chaos

    ray.init(num_gpus=2, include_dashboard=False, ignore_reinit_error=True)
    ray.cloudpickle.register_pickle_by_value(test_chaos)
    try:
        plan = [{"phase": "forward", "rank": 1, "step": 3, "mode": "stop"}]
        cluster, history, _ = test_chaos._run(tmp_path, plan, max_failures=1, device="cuda",
                                              phase_timeout_s=15)
    finally:
        ray.shutdown()
    failure = cluster.failures[0]
    assert "rank 1 does not answer" in failure["error"] and "fc_out" in failure["error"], failure
    assert failure["recovered"] and failure["torn_down_s"] < 60
    np.testing.assert_allclose([h["loss"] for h in history], test_chaos.reference_losses(), rtol=1e-9)
