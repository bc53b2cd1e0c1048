"""The configuration of a GPT-2 / Llama style decoder: small, frozen, picklable."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from raytp import validate
from raytp.nn.attention import check_heads
from raytp.nn.mlp import ACTIVATIONS

if TYPE_CHECKING:
    from raytp.mesh import DeviceMesh
    from raytp.models.gpt import GPT

NORMS = ("layernorm", "rmsnorm")
POSITIONS = ("rope", "learned")
DTYPES = ("float32", "bfloat16", "float16", "float64")
IGNORE_INDEX = -100  # a label that takes no part in the loss


@dataclass(frozen=True)
class GPTConfig:
    """A decoder-only transformer. The defaults are GPT-2 small; Llama style is
    ``norm="rmsnorm", activation="swiglu", positions="rope", bias=False,
    tie_embeddings=False`` (with ``n_kv_heads`` for grouped-query attention).

    ``n_kv_heads`` defaults to ``n_heads`` and ``d_ff`` to ``4 * d_model``. ``dtype``
    is a name (``"float32"``, ``"bfloat16"``, ...) so that the config pickles cleanly.
    Sizes that tp must divide are checked when the model is built (:meth:`check_tp`).
    """

    vocab_size: int = 50257
    n_layers: int = 12
    n_heads: int = 12
    n_kv_heads: int | None = None
    d_model: int = 768
    d_ff: int | None = None
    max_seq_len: int = 1024
    norm: str = "layernorm"
    activation: str = "gelu"
    positions: str = "learned"
    tie_embeddings: bool = True
    dropout: float = 0.0
    sequence_parallel: bool = False
    dtype: str = "float32"
    bias: bool = True
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    init_std: float = 0.02

    def __post_init__(self):
        if self.n_kv_heads is None:
            object.__setattr__(self, "n_kv_heads", self.n_heads)
        if self.d_ff is None and isinstance(self.d_model, int):
            object.__setattr__(self, "d_ff", 4 * self.d_model)
        for name in ("vocab_size", "n_layers", "n_heads", "n_kv_heads", "d_model", "d_ff", "max_seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"GPTConfig: {name}={value!r} must be a positive integer")
        for name, choices in (("norm", NORMS), ("activation", ACTIVATIONS), ("positions", POSITIONS),
                              ("dtype", DTYPES)):
            if getattr(self, name) not in choices:
                raise ValueError(f"GPTConfig: {name}={getattr(self, name)!r} is not one of {choices}")
        self._check_shapes()
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"GPTConfig: dropout={self.dropout} must be in [0, 1)")
        for name in ("rope_theta", "norm_eps", "init_std"):
            if not getattr(self, name) > 0:
                raise ValueError(f"GPTConfig: {name}={getattr(self, name)} must be positive")

    def _check_shapes(self) -> None:
        if self.d_model % self.n_heads:
            raise ValueError(f"GPTConfig: d_model={self.d_model} is not divisible by "
                             f"n_heads={self.n_heads}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"GPTConfig: n_heads={self.n_heads} is not divisible by "
                             f"n_kv_heads={self.n_kv_heads}")
        if self.positions == "rope" and self.head_dim % 2:
            raise ValueError(f"GPTConfig: RoPE needs an even head_dim, got d_model / n_heads = "
                             f"{self.d_model} / {self.n_heads} = {self.head_dim}")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    def check_tp(self, tp: int) -> None:
        """Raise a ValueError naming the sizes when the model cannot be split ``tp`` ways.
        (The vocabulary need not divide: it is padded.)"""
        check_heads(self.n_heads, self.n_kv_heads, tp)
        if self.d_ff % tp:
            raise ValueError(f"d_ff={self.d_ff} is not divisible by tp={tp}")

    def validate_batch(self, batch: Mapping[str, np.ndarray], tp: int) -> None:
        """Raise a ValueError naming the entry unless ``batch`` is what :meth:`GPT.loss`
        reads: ``input_ids`` (B, T) integers in [0, vocab_size), 1 <= T <= max_seq_len,
        T divisible by ``tp`` under sequence parallelism; optional ``labels`` of the same
        shape, each a token id or -100 (ignored). Other keys pass (a loss function may
        read them)."""
        reads = "a GPT reads input_ids (batch, seq_len) and optional labels"
        ids = validate.entry(batch, "input_ids", reads)
        validate.check_token_ids("input_ids", ids, self.vocab_size, self.max_seq_len)
        if self.sequence_parallel and ids.shape[1] % tp:
            raise ValueError(f"input_ids has sequence length {ids.shape[1]}, not divisible by tp={tp}: "
                             "sequence_parallel=True splits the sequence over the TP ranks")
        if "labels" in batch:
            labels = batch["labels"]
            validate.check_integers("labels", labels, "labels")
            validate.check_shape("labels", labels, ids.shape, "input_ids")
            validate.check_range("labels", labels, self.vocab_size, f"a label is a token id in "
                                 f"[0, {self.vocab_size}) or {IGNORE_INDEX} (ignored)", IGNORE_INDEX)

    def build(self, mesh: DeviceMesh, device: torch.device | str | None = None) -> GPT:
        """This rank's shard of the model. Call it on every rank after seeding torch the
        same way on each: the full weights are drawn, then sliced, so every tp holds the
        same model."""
        from raytp.models.gpt import GPT

        return GPT(self, mesh, device=device)

    def matmul_params(self) -> int:
        """Weights that take part in a matrix multiply per token (the LM head included,
        the embedding lookups and norms not)."""
        d, hd = self.d_model, self.head_dim
        attn = d * (self.n_heads + 2 * self.n_kv_heads) * hd + self.n_heads * hd * d
        mlp = d * self.d_ff * (3 if self.activation == "swiglu" else 2)
        return self.n_layers * (attn + mlp) + self.vocab_size * d

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs per token: 6 per matmul weight (forward 2, backward 4) plus
        attention's scores and weighted sum, 12 * n_layers * d_model * seq_len (PaLM's
        count, causal masking not discounted). ``seq_len`` defaults to max_seq_len."""
        seq_len = self.max_seq_len if seq_len is None else seq_len
        attention = 12 * self.n_layers * self.n_heads * self.head_dim * seq_len
        return float(6 * self.matmul_params() + attention)
