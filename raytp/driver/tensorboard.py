"""TensorBoard event files from the driver: ``fit(..., log_dir=...)``, or
``fit(..., callbacks=[TensorBoardLogger(log_dir)])`` (a :mod:`raytp.driver.callbacks` callback).

One scalar per step and metric under ``train/`` (loss, lr, grad norm, tokens/s,
TFLOP/s, MFU, peak memory, step time) and ``eval/loss`` whenever ``fit`` evaluates,
written with ``torch.utils.tensorboard`` (the ``tensorboard`` package). The step
number on the x-axis is the optimizer step.
"""

from __future__ import annotations

from typing import Any

from raytp.driver.callbacks import Callback

SCALARS = {"loss": "train/loss", "lr": "train/lr", "grad_norm": "train/grad_norm",
           "tokens_per_s": "train/tokens_per_s", "samples_per_s": "train/samples_per_s",
           "tflops": "train/tflops_per_gpu", "mfu": "train/mfu", "step_s": "train/step_s",
           "peak_mem_bytes": "train/peak_mem_gib"}


class TensorBoardLogger(Callback):
    """Writes each step's summary (and evaluations) into ``log_dir``; :meth:`close` flushes
    (``fit`` closes the one it makes for ``log_dir``)."""

    def __init__(self, log_dir: str):
        from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package

        self.writer = SummaryWriter(log_dir=str(log_dir))

    def on_step(self, summary: dict[str, Any]) -> None:
        step = summary["step"]
        for key, tag in SCALARS.items():
            value = summary.get(key)
            if value is None:
                continue
            if key == "peak_mem_bytes":
                value = value / 2**30
            self.writer.add_scalar(tag, float(value), step)

    def on_eval(self, summary: dict[str, Any]) -> None:
        self.writer.add_scalar("eval/loss", float(summary["eval_loss"]), summary["step"])

    def close(self) -> None:
        self.writer.flush()
        self.writer.close()
