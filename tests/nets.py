"""The small float64 MLP the driver tests train, its plan, batches, and its losses in
one process (the reference every TP run is compared with). Test modules that send it
to rank actors name this module in ``RAY_BY_VALUE`` (see conftest.py)."""

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

PLAN = {"fc_in": "colwise", "fc_out": "rowwise"}


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc_in = nn.Linear(12, 32, dtype=torch.float64)
        self.fc_out = nn.Linear(32, 5, dtype=torch.float64)

    def forward(self, x):
        return self.fc_out(torch.tanh(self.fc_in(x)))


def make_batches(n_steps, batch_size=8, seed=0):
    rng = np.random.default_rng(seed)
    return [{"x": rng.standard_normal((batch_size, 12)), "y": rng.integers(0, 5, batch_size)}
            for _ in range(n_steps)]


def reference_losses(batches, optimizer, seed=0):
    torch.manual_seed(seed)
    model = Net()
    opt = optimizer.build(model)  # the groups the ranks build: no weight decay on biases
    losses = []
    for b in batches:
        loss = F.cross_entropy(model(torch.from_numpy(b["x"])), torch.from_numpy(b["y"]))
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses
