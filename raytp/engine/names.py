"""The module names a build will have, known on the driver before any rank work, so
that a module-name pattern matching nothing is refused there (:meth:`BuildSpec.check_names`).

- A plain module's factory runs on the meta device (no memory).
- A raytp model config (GPT, BERT) is built in miniature — the same layers, blocks and
  options, each width shrunk to a few elements — at tp=1 on the CPU, over a one-rank
  mesh of its own (:class:`_Solo`; no process group). Module names do not depend on
  the widths or on tp. torch's RNG is left as it was.

Where neither works (a factory that reads weights, a pretrained checkpoint), None: the
ranks check the patterns when they build.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from raytp.comm.backend import Communicator


class _Solo(Communicator):
    """A one-rank group: every collective is the identity (nothing is sent)."""

    def __init__(self, name: str):
        super().__init__(0, 1, name)

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    def _all_reduce(self, tensor, async_op):
        return None

    def _all_gather(self, out, tensor, async_op):
        out.copy_(tensor.reshape(out.shape))

    def _reduce_scatter(self, out, tensor, async_op):
        out.copy_(tensor.reshape(out.shape))

    def _all_to_all(self, out, tensor):
        out.copy_(tensor)

    def _broadcast(self, tensor, src):
        return None

    def _scatter(self, out, chunks, src):
        out.copy_(chunks[0])


def module_for_names(model) -> nn.Module | None:
    """A module with the names ``model`` (a raytp config or a zero-argument factory) will
    have on the ranks, or None where it cannot be made here."""
    from raytp.models import BertConfig, GPTConfig

    try:
        with torch.random.fork_rng(devices=[]):
            if isinstance(model, (GPTConfig, BertConfig)):
                return _miniature(model)
            if hasattr(model, "build"):
                return None  # e.g. a pretrained model: its weights are read on the ranks
            with torch.device("meta"):
                return model()
    except Exception:  # noqa: BLE001 - e.g. a factory that reads weights: the ranks check
        return None


def _miniature(config) -> nn.Module:
    from raytp.mesh import DeviceMesh

    widths = {"d_model": 2 * config.n_heads, "vocab_size": 8, "max_seq_len": 4, "dtype": "float32"}
    if getattr(config, "d_ff", None) is not None:
        widths["d_ff"] = 4
    small = dataclasses.replace(config, **widths)
    mesh = DeviceMesh.from_communicators(_Solo("tp"), _Solo("dp"), "cpu")
    return small.build(mesh, device="cpu")
