"""``raytp bench`` under ``torchrun``: the per-rank function the Ray actors run, here in
torchrun's processes, for comparing the two launchers on the same code.

    torchrun --standalone --nproc_per_node 2 -m raytp.bench.torchrun_entry --json out.json \\
        [--options '{"quick": true, ...}'] [--device cuda|cpu]

Rank 0 writes ``{"meta": ..., "rows": [...]}`` (see :func:`raytp.bench.results.combine`).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

import torch
import torch.distributed as dist

import raytp
from raytp.bench.results import combine
from raytp.bench.runner import BenchOptions, run_rank


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m raytp.bench.torchrun_entry", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", required=True, help="rank 0 writes the results here")
    parser.add_argument("--options", default="{}", help="BenchOptions as JSON")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    args = parser.parse_args(argv)
    options = BenchOptions.from_dict(json.loads(args.options))
    cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    raytp.init_distributed("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"[torchrun rank {rank}] %(levelname)s %(name)s: %(message)s")
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    mesh = raytp.DeviceMesh(tp=world, device=device)
    try:
        result = run_rank(mesh, options)
        gathered = [None] * world
        dist.all_gather_object(gathered, result)
        if rank == 0:
            with open(args.json, "w") as f:
                json.dump({**combine(gathered), "launcher": "torchrun"}, f, indent=1)
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
