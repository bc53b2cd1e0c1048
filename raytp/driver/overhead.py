"""The cost of the driver: the same training steps coordinated by the driver, and
looped inside the actors. ``raytp bench control-plane`` prints the table and JSON."""

from __future__ import annotations

import json
import time

import numpy as np
from torch import nn

import raytp


class _MLP(nn.Module):
    def __init__(self, hidden: int):
        super().__init__()
        self.fc_in = nn.Linear(hidden, 4 * hidden)
        self.fc_out = nn.Linear(4 * hidden, hidden)

    def forward(self, x):
        return self.fc_out(nn.functional.gelu(self.fc_in(x)))


def _mse(model, batch):
    return nn.functional.mse_loss(model(batch["x"]), batch["y"])


def measure(cluster, hidden: int, tokens: int, steps: int, warmup: int = 3) -> dict:
    """Seconds per step: pipelined driver steps (``fit``), blocking ``train_step`` calls,
    and the in-actor loop. The model is an MLP block; ``hidden`` sets the step time."""
    rng = np.random.default_rng(0)
    batch = {"x": rng.standard_normal((tokens, hidden), dtype=np.float32),
             "y": rng.standard_normal((tokens, hidden), dtype=np.float32)}
    cluster.build(lambda: _MLP(hidden), plan={"fc_in": "colwise", "fc_out": "rowwise"},
                  loss_fn=_mse, optimizer=raytp.SGD(lr=1e-3))
    row = time_modes(cluster, batch, steps, warmup)
    return {"model": f"MLP {hidden}->{4 * hidden}->{hidden}, {tokens} tokens, fp32", "hidden": hidden,
            "tokens": tokens, **row}


def measure_model(cluster, model, batch: dict, steps: int, warmup: int = 3, *, name: str,
                  **build_kwargs) -> dict:
    """:func:`time_modes` of any model ``cluster.build`` takes (a raytp config such as a
    ``GPTConfig``, trained with its own loss and AdamW by default) on one batch."""
    cluster.build(model, **build_kwargs)
    return {"model": name, **time_modes(cluster, batch, steps, warmup)}


def time_modes(cluster, batch: dict, steps: int, warmup: int = 3) -> dict:
    """The built model's training step three ways, in ms per step: pipelined driver steps
    (``fit``), blocking ``train_step`` calls, and ``steps`` steps looped inside the actors."""
    cluster.fit([batch] * warmup, progress=False)

    start = time.perf_counter()
    cluster.fit([batch] * steps, progress=False)
    pipelined = (time.perf_counter() - start) / steps
    pipelined_rows = cluster.metrics()[-steps * cluster.world_size:]

    start = time.perf_counter()
    for _ in range(steps):
        cluster.train_step(batch)
    blocking = (time.perf_counter() - start) / steps
    blocking_rows = cluster.metrics()[-steps * cluster.world_size:]

    ref = cluster.put_batch(batch).refs
    start = time.perf_counter()
    in_actor = max(cluster.run("loop_train_steps", per_rank_args=[(r, steps) for r in ref])) / steps
    wall_in_actor = (time.perf_counter() - start) / steps
    return {
        "steps": steps, "tp": cluster.tp, "dp": cluster.dp, "device": cluster.device,
        "in_actor_ms": in_actor * 1e3, "in_actor_wall_ms": wall_in_actor * 1e3,
        "driver_pipelined_ms": pipelined * 1e3, "driver_blocking_ms": blocking * 1e3,
        "pipelined_ratio": pipelined / in_actor, "blocking_ratio": blocking / in_actor,
        # where the difference goes, per step (medians over ranks and steps): the time a rank
        # sat idle between two calls, and its host time inside a call beyond the GPU phases
        "pipelined_idle_ms": _median_ms(pipelined_rows, "idle_s"),
        "blocking_idle_ms": _median_ms(blocking_rows, "idle_s"),
        "pipelined_host_ms": _median_ms(pipelined_rows, "host_s"),
        "blocking_host_ms": _median_ms(blocking_rows, "host_s"),
        "phases_ms": _median_ms(blocking_rows, "step_s"),
    }


def _median_ms(rows: list[dict], key: str) -> float | None:
    values = [r[key] for r in rows if r.get(key) is not None]
    return float(np.median(values)) * 1e3 if values else None


def main(tp: int = 2, sizes: tuple[int, ...] = (256, 1024), tokens: int = 512, steps: int = 30,
         device: str = "auto", json_path: str | None = None) -> list[dict]:
    results = []
    with raytp.TPCluster(tp=tp, device=device) as cluster:
        for hidden in sizes:
            results.append(measure(cluster, hidden, tokens, steps))
    print(f"\ncontrol plane: tp={tp}, {results[0]['device']}, {steps} steps, MLP block "
          f"hidden->4*hidden->hidden, {tokens} tokens, fp32")
    print(f"{'hidden':>7} {'in-actor ms':>12} {'driver pipelined ms':>20} {'ratio':>6} "
          f"{'driver blocking ms':>19} {'ratio':>6}")
    for r in results:
        print(f"{r['hidden']:>7} {r['in_actor_ms']:>12.2f} {r['driver_pipelined_ms']:>20.2f} "
              f"{r['pipelined_ratio']:>6.3f} {r['driver_blocking_ms']:>19.2f} {r['blocking_ratio']:>6.3f}")
    if json_path:
        with open(json_path, "w") as f:
            json.dump(results, f, indent=2)
    return results
