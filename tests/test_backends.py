"""Collective backends by name (raytp.comm.backends): the registry and its errors, the
rendezvous each built-in backend asks for, and a backend registered by a user running a
TPCluster on CPU ranks through the driver's generic rendezvous."""

import dataclasses
import datetime
import os
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist

import raytp

import nets
from nets import PLAN, Net, reference_losses

RAY_BY_VALUE = (nets,)


@dataclasses.dataclass(frozen=True)
class FileStoreGloo:
    """A test backend: a gloo world met through a file store that rank 0 names (not a
    TCP port); each rank notes in ``marks`` the store it joined through."""

    marks: str
    name: str = "file-store-gloo"

    def check(self, device):
        if device == "cuda":
            raise ValueError("backend='file-store-gloo' runs on CPU ranks only")

    def leaders(self, tp, dp):
        return {"store": 0}

    def leader_info(self, key, host):
        return os.path.join(tempfile.mkdtemp(prefix="raytp-store-"), "store")

    def rank_info(self, rank, tp, dp, infos):
        return infos["store"]

    def join(self, rank, tp, dp, device, info, timeout_s):
        dist.init_process_group("gloo", init_method=f"file://{info}", rank=rank, world_size=tp * dp,
                                timeout=datetime.timedelta(seconds=timeout_s))
        Path(self.marks, f"rank{rank}").write_text(f"{info} {device}")
        return raytp.DeviceMesh(tp=tp, dp=dp, device=device)


@dataclasses.dataclass(frozen=True)
class NoCpu(FileStoreGloo):
    name: str = "no-cpu"

    def check(self, device):
        if device == "cpu":
            raise ValueError("backend='no-cpu' refuses device='cpu'")


@pytest.fixture
def registered():
    """Register backends by name for one test, and forget them after it."""
    names = []

    def register(name, backend):
        raytp.comm.register_backend(name, backend)
        names.append(name)

    yield register
    for name in names:
        raytp.comm.unregister_backend(name)


def test_unknown_name_lists_the_registered_ones(registered):
    with pytest.raises(ValueError, match=r"^backend='mpi' must be one of \('auto', 'torch', 'cupy-nccl'\)$"):
        raytp.comm.get_backend("mpi")
    registered("file-store-gloo", FileStoreGloo("unused"))
    with pytest.raises(ValueError, match=r"^backend='nccl' must be one of "
                                         r"\('auto', 'torch', 'cupy-nccl', 'file-store-gloo'\)$"):
        raytp.comm.get_backend("nccl")
    with pytest.raises(ValueError, match=r"^backend=None must be one of"):
        raytp.comm.get_backend(None)


def test_auto_is_torch_and_names_stay_registered_once(registered):
    assert raytp.comm.get_backend("auto") is raytp.comm.get_backend("torch")
    assert raytp.comm.get_backend("auto").name == "torch"
    backend = FileStoreGloo("unused")
    registered("file-store-gloo", backend)
    assert raytp.comm.get_backend("file-store-gloo") is backend
    with pytest.raises(ValueError, match=r"^backend 'file-store-gloo' is already registered$"):
        raytp.comm.register_backend("file-store-gloo", backend)
    with pytest.raises(ValueError, match=r"^backend 'torch' is already registered$"):
        raytp.comm.register_backend("torch", backend)
    with pytest.raises(ValueError, match=r"^backend 'cupy-nccl' is built in; it stays registered$"):
        raytp.comm.unregister_backend("cupy-nccl")
    with pytest.raises(TypeError, match=r"^backend 'half' \(object\) lacks \['name', 'check', 'leaders', "
                                        r"'leader_info', 'rank_info', 'join'\]$"):
        raytp.comm.register_backend("half", object())
    with pytest.raises(ValueError, match=r"^a backend name must be a non-empty string, got ''$"):
        raytp.comm.register_backend("", backend)
    assert "half" not in raytp.comm.backend_names()


def test_torch_rendezvous_is_rank_zeros_host_and_a_port():
    torch_backend = raytp.comm.get_backend("torch")
    assert torch_backend.leaders(2, 3) == {"world": 0}
    host, port = torch_backend.leader_info("world", "10.0.0.7")
    assert host == "10.0.0.7" and 0 < port < 65536
    assert all(torch_backend.rank_info(r, 2, 3, {"world": (host, port)}) == (host, port) for r in range(6))
    assert [torch_backend.process_group_backend(d) for d in ("cpu", "cuda", torch.device("cuda", 1))] == \
        ["gloo", "nccl", "nccl"]


@pytest.mark.parametrize("tp,dp", [(2, 3), (4, 1), (1, 2)])
def test_cupy_rendezvous_has_an_id_per_group_made_on_its_first_rank(tp, dp):
    cupy = raytp.comm.get_backend("cupy-nccl")
    leaders = cupy.leaders(tp, dp)
    assert leaders == {**{("tp", d): d * tp for d in range(dp)}, **{("dp", t): t for t in range(tp)}}
    infos = {key: f"id of {key}" for key in leaders}
    for rank in range(tp * dp):
        tp_id, dp_id = cupy.rank_info(rank, tp, dp, infos)
        assert tp_id == f"id of {('tp', rank // tp)}" and dp_id == f"id of {('dp', rank % tp)}"


def test_cupy_nccl_refuses_cpu_before_anything_starts():
    cupy = raytp.comm.get_backend("cupy-nccl")
    for device in ("cuda", "auto"):
        cupy.check(device)
    message = r"^backend='cupy-nccl' is NCCL: it needs device='cuda' \(or 'auto' on GPUs\)$"
    with pytest.raises(ValueError, match=message):
        cupy.check("cpu")
    with pytest.raises(ValueError, match=message):
        raytp.TPCluster(tp=2, backend="cupy-nccl", device="cpu")


def test_a_registered_backend_refuses_its_devices_in_tpcluster(registered):
    registered("no-cpu", NoCpu("unused"))
    with pytest.raises(ValueError, match=r"^backend='no-cpu' refuses device='cpu'$"):
        raytp.TPCluster(tp=2, backend="no-cpu", device="cpu")


def test_tpcluster_runs_on_a_backend_registered_by_name(ray_local, registered, tmp_path):
    """TPCluster(backend=<a registered name>): rank 0 makes the store path, both ranks
    join through it, and two train steps equal one process."""
    registered("file-store-gloo", FileStoreGloo(str(tmp_path)))
    rng = np.random.default_rng(0)
    batches = [{"x": rng.standard_normal((8, 12)), "y": rng.integers(0, 5, 8)} for _ in range(2)]
    optimizer = raytp.SGD(lr=0.1)
    with raytp.TPCluster(tp=2, backend="file-store-gloo", device="cpu") as cluster:
        assert cluster.backend == "file-store-gloo"
        cluster.build(Net, plan=PLAN, optimizer=optimizer, seed=0)
        losses = [cluster.train_step(b)["loss"] for b in batches]
    np.testing.assert_allclose(losses, reference_losses(batches, optimizer), rtol=1e-10)
    marks = {p.name: p.read_text().split() for p in tmp_path.iterdir()}
    assert set(marks) == {"rank0", "rank1"}
    assert marks["rank0"] == marks["rank1"] and marks["rank0"][1] == "cpu"
    assert marks["rank0"][0].endswith("/store") and "raytp-store-" in marks["rank0"][0]
