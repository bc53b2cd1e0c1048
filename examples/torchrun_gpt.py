"""The rank a Ray actor builds, built under torchrun: ``raytp.engine.build_engine``.

    torchrun --standalone --nproc_per_node 2 examples/torchrun_gpt.py --steps 5

``BuildSpec`` is the same record ``TPCluster.build`` sends to its rank actors, so this
script trains exactly what ``cluster.build(spec)`` + ``cluster.train_step`` would: the
same seeded shards, loss, optimizer and metrics, with no Ray in the process.
"""

import argparse
import json

import numpy as np
import torch.distributed as dist

import raytp
from raytp.engine import BuildSpec, build_engine
from raytp.models import GPTConfig

CONFIG = GPTConfig(vocab_size=61, n_layers=2, n_heads=4, n_kv_heads=2, d_model=32, d_ff=64, max_seq_len=16,
                   norm="rmsnorm", activation="swiglu", positions="rope", tie_embeddings=False, bias=False,
                   dtype="float64")
SPEC = BuildSpec(model=CONFIG, optimizer=raytp.AdamW(lr=1e-2), seed=0, max_grad_norm=1.0)


def batches(steps: int, batch_size: int = 4, seed: int = 1) -> list[dict]:
    """One random token batch per step, the same on every rank (and in the driver of a
    TPCluster); it repeats, so that the loss visibly falls in a few steps."""
    ids = np.random.default_rng(seed).integers(0, CONFIG.vocab_size, (batch_size, CONFIG.max_seq_len))
    return [{"input_ids": ids} for _ in range(steps)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--steps", type=int, default=5, help="training steps")
    args = parser.parse_args()
    raytp.init_distributed()
    mesh = raytp.DeviceMesh(tp=dist.get_world_size())
    engine = build_engine(mesh, SPEC)
    losses = [engine.train_step(batch)["loss"] for batch in batches(args.steps)]
    if mesh.rank == 0:
        print(json.dumps({"tp": mesh.tp_size, "losses": losses}))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
