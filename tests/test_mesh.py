"""DeviceMesh groups, its errors, and init_distributed under torchrun."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch.distributed as dist

import raytp

import _dist
from helpers import world


def _check_groups(tp, dp):
    rank, n = world()
    m = raytp.DeviceMesh(tp=tp, dp=dp)
    tp_ranks = dist.get_process_group_ranks(m.tp_group)
    dp_ranks = dist.get_process_group_ranks(m.dp_group)
    return m.tp_rank, m.tp_size, m.dp_rank, m.dp_size, tp_ranks, dp_ranks, str(m.device)


@pytest.mark.parametrize("tp,dp", [(4, 1), (2, 2), (1, 4)])
def test_tp_groups_are_consecutive_ranks(tp, dp):
    results = _dist.run(4, _check_groups, tp, dp)
    for rank, (tp_rank, tp_size, dp_rank, dp_size, tp_ranks, dp_ranks, device) in enumerate(results):
        assert (tp_rank, dp_rank) == (rank % tp, rank // tp)
        assert (tp_size, dp_size) == (tp, dp)
        assert tp_ranks == [dp_rank * tp + t for t in range(tp)]
        assert dp_ranks == [d * tp + tp_rank for d in range(dp)]
        assert device == "cpu"


def _check_bad_sizes():
    with pytest.raises(ValueError, match=r"world size 4 != tp\*dp = 2\*1 = 2"):
        raytp.DeviceMesh(tp=2)
    with pytest.raises(ValueError, match=r"tp=0 must be a positive integer"):
        raytp.DeviceMesh(tp=0, dp=4)


def test_world_size_must_equal_tp_times_dp():
    _dist.run(4, _check_bad_sizes)


def test_mesh_needs_an_initialized_world():
    with pytest.raises(RuntimeError, match="init_distributed"):
        raytp.DeviceMesh(tp=1)


def test_init_distributed_needs_torchrun_environment(monkeypatch):
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    with pytest.raises(RuntimeError, match="torchrun's environment"):
        raytp.init_distributed()


def test_torchrun_example_trains():
    """The core under torchrun, no Ray: init_distributed + DeviceMesh + ParallelMLP."""
    root = Path(__file__).parents[1]
    torchrun = Path(sys.executable).with_name("torchrun")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([str(torchrun), "--standalone", "--nproc_per_node", "2",
                          str(root / "examples" / "torchrun_mlp.py")],
                         capture_output=True, text=True, timeout=180, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    losses = [float(x) for x in re.findall(r"loss ([0-9.]+)", out.stdout)]
    assert len(losses) == 5 and losses[-1] < losses[0]
