"""raytp's core without Ray: a TP MLP trained under torchrun.

    torchrun --standalone --nproc_per_node 2 examples/torchrun_mlp.py

Every rank builds the model from the same seed and keeps only its shards; the
gradient sync and the global norm are explicit calls, in the order a step needs.
"""

import torch
import torch.distributed as dist
import torch.nn.functional as F

import raytp
from raytp.nn import ParallelMLP


def main(steps: int = 5) -> None:
    raytp.init_distributed()
    mesh = raytp.DeviceMesh(tp=dist.get_world_size())
    torch.manual_seed(0)
    mlp = ParallelMLP(16, 64, mesh=mesh, dtype=torch.float64, device=mesh.device)
    opt = raytp.AdamW(lr=1e-2).build(mlp.parameters())
    data = torch.randn(steps, 32, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    for step in range(steps):
        x = data[step].to(mesh.device)
        loss = F.mse_loss(mlp(x), x.flip(-1))
        loss.backward()
        raytp.sync_grads(mlp, mesh)
        raytp.clip_grad_norm_(mlp.parameters(), 1.0, mesh)
        opt.step()
        opt.zero_grad()
        if mesh.rank == 0:
            print(f"step {step}  loss {loss.item():.6f}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
