"""A BERT-style encoder built from raytp's TP layers, and sentence embeddings from it.

Word embeddings split over the (padded) vocabulary, learned positions and token
types replicated, then post-norm layers: ``x = norm(x + attn(x))``,
``x = norm(x + mlp(x))`` with bidirectional attention (a padding mask on the keys)
and a GELU MLP. The hidden states between layers are replicated on every rank.
Parameter names: ``embed``, ``pos_embed``, ``type_embed``, ``embed_norm``,
``layers.{i}.attn.qkv``, ``layers.{i}.attn.proj``, ``layers.{i}.attn_norm``,
``layers.{i}.mlp.fc_in``, ``layers.{i}.mlp.fc_out``, ``layers.{i}.mlp_norm``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from raytp import validate
from raytp.mesh import DeviceMesh
from raytp.nn import (
    LayerNorm,
    ParallelAttention,
    ParallelMLP,
    PositionEmbedding,
    VocabParallelEmbedding,
    check_heads,
)
from raytp.params import ParamSpec, materialize_, reset_parameters_, set_spec
from raytp.placement import Replicate
from raytp.random import RNGTracker, TPDropout


@dataclass(frozen=True)
class BertConfig:
    """A BERT encoder; the defaults are BERT-base. ``d_ff`` defaults to ``4 * d_model``."""

    vocab_size: int = 30522
    n_layers: int = 12
    n_heads: int = 12
    d_model: int = 768
    d_ff: int | None = None
    max_seq_len: int = 512
    type_vocab_size: int = 2
    activation: str = "gelu"
    norm_eps: float = 1e-12
    dropout: float = 0.0
    dtype: str = "float32"
    init_std: float = 0.02

    def __post_init__(self):
        if self.d_ff is None and isinstance(self.d_model, int):
            object.__setattr__(self, "d_ff", 4 * self.d_model)
        for name in ("vocab_size", "n_layers", "n_heads", "d_model", "d_ff", "max_seq_len",
                     "type_vocab_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"BertConfig: {name}={value!r} must be a positive integer")
        if self.d_model % self.n_heads:
            raise ValueError(f"BertConfig: d_model={self.d_model} is not divisible by n_heads={self.n_heads}")
        if self.activation not in ("gelu", "gelu_tanh"):
            raise ValueError(f"BertConfig: activation={self.activation!r} is not one of "
                             "('gelu', 'gelu_tanh')")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"BertConfig: dropout={self.dropout} must be in [0, 1)")

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    def check_tp(self, tp: int) -> None:
        """Raise a ValueError naming the sizes when the model cannot be split ``tp`` ways."""
        check_heads(self.n_heads, self.n_heads, tp)
        if self.d_ff % tp:
            raise ValueError(f"d_ff={self.d_ff} is not divisible by tp={tp}")

    def validate_batch(self, batch: Mapping[str, np.ndarray], tp: int) -> None:
        """Raise a ValueError naming the entry unless ``batch`` holds ``input_ids`` (B, T),
        integers in [0, vocab_size), T <= max_seq_len, and, if present, ``token_type_ids``
        in [0, type_vocab_size) and ``attention_mask``, both of input_ids' shape."""
        ids = validate.entry(batch, "input_ids", "a BERT encoder reads input_ids (batch, seq_len)")
        validate.check_token_ids("input_ids", ids, self.vocab_size, self.max_seq_len)
        for key in ("token_type_ids", "attention_mask"):
            if key in batch:
                validate.check_shape(key, batch[key], ids.shape, "input_ids")
        if "token_type_ids" in batch:
            validate.check_integers("token_type_ids", batch["token_type_ids"], "token type ids")
            validate.check_range("token_type_ids", batch["token_type_ids"], self.type_vocab_size,
                                 f"there are {self.type_vocab_size} token types")

    def build(self, mesh: DeviceMesh, device: torch.device | str | None = None) -> Bert:
        """This rank's shard; seed torch the same way on every rank first."""
        return Bert(self, mesh, device=device)


class TokenTypeEmbedding(nn.Module):
    """A small (type_vocab_size, dim) table, replicated, initialized normal(0, ``init_std``).
    Input (B, T) ids, output (B, T, dim). Collectives: none."""

    def __init__(self, n_types: int, dim: int, *, mesh: DeviceMesh, device=None, dtype=None,
                 init_std: float = 1.0):
        super().__init__()
        self.init_std = init_std
        weight = nn.Parameter(torch.empty(n_types, dim, device=device, dtype=dtype))
        self.weight = set_spec(weight, ParamSpec(Replicate(), weight.shape, mesh.tp_size))
        if self.weight.device.type != "meta":
            self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """normal(0, init_std); replicated, so the full table is this rank's."""
        nn.init.normal_(self.weight, 0.0, self.init_std)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.weight)


class EncoderLayer(nn.Module):
    """Post-norm encoder layer. Input and output (B, T, d_model), replicated.
    Collectives: forward two all-reduces, backward two."""

    def __init__(self, config: BertConfig, mesh: DeviceMesh, rng: RNGTracker, device):
        super().__init__()
        c = config
        layer = {"mesh": mesh, "device": device, "dtype": c.torch_dtype}
        self.attn = ParallelAttention(c.d_model, c.n_heads, dropout=c.dropout, rng=rng, causal=False,
                                      init_std=c.init_std, **layer)
        self.attn_norm = LayerNorm(c.d_model, eps=c.norm_eps, **layer)
        self.mlp = ParallelMLP(c.d_model, c.d_ff, activation=c.activation, init_std=c.init_std, **layer)
        self.mlp_norm = LayerNorm(c.d_model, eps=c.norm_eps, **layer)
        self.dropout = TPDropout(c.dropout, rng, "replicated")

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = self.attn_norm(x + self.dropout(self.attn(x, attn_mask=attn_mask)))
        return self.mlp_norm(x + self.dropout(self.mlp(x)))


class Bert(nn.Module):
    """This rank's shard of a BERT encoder (see :class:`BertConfig`).

    ``forward(input_ids (B, T), attention_mask (B, T) or None, token_type_ids (B, T) or
    None)`` returns the last hidden states (B, T, d_model), replicated. Initialized as
    BERT is (normal(0, init_std) weights, zero biases) by drawing each full tensor and
    keeping this rank's slice; ``init=False`` leaves them for a loader to fill.
    """

    def __init__(self, config: BertConfig, mesh: DeviceMesh, *, device=None,
                 dropout_seed: int | None = None, init: bool = True):
        super().__init__()
        config.check_tp(mesh.tp_size)
        self.config, self.mesh = config, mesh
        device = torch.device(device) if device is not None else mesh.device
        drawn = int(torch.randint(0, 2**62, ()).item())
        self.rng = RNGTracker(drawn if dropout_seed is None else dropout_seed, mesh.tp_rank, device)
        c, layer = config, {"mesh": mesh, "device": "meta", "dtype": config.torch_dtype}
        normal = {"init_std": c.init_std, **layer}
        self.embed = VocabParallelEmbedding(c.vocab_size, c.d_model, **normal)
        self.pos_embed = PositionEmbedding(c.max_seq_len, c.d_model, **normal)
        self.type_embed = TokenTypeEmbedding(c.type_vocab_size, c.d_model, **normal)
        self.embed_norm = LayerNorm(c.d_model, eps=c.norm_eps, **layer)
        self.embed_dropout = TPDropout(c.dropout, self.rng, "replicated")
        self.layers = nn.ModuleList(EncoderLayer(c, mesh, self.rng, "meta") for _ in range(c.n_layers))
        materialize_(self, device)
        if init:
            self.reset_parameters()

    def reset_parameters(self) -> None:
        """BERT's initialization: each layer draws its full tensors with ``init_std``, in
        module order, and keeps this rank's slice."""
        reset_parameters_(self)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        T = input_ids.shape[1]
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        x = self.embed(input_ids) + self.type_embed(token_type_ids) + self.pos_embed(0, T)
        x = self.embed_dropout(self.embed_norm(x))  # (B, T, d_model)
        for layer in self.layers:
            x = layer(x, attention_mask)
        return x


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """(B, T, d) hidden states, (B, T) mask -> (B, d) mean over the unmasked positions."""
    if attention_mask is None:
        return hidden.mean(1)
    mask = attention_mask.to(hidden.dtype).unsqueeze(-1)  # (B, T, 1)
    return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)


@torch.no_grad()
def sentence_embeddings(model: Bert, input_ids: torch.Tensor,
                        attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """(B, d) L2-normalized mean-pooled embeddings, as sentence-transformers computes them
    (all-MiniLM-L6-v2's pooling), the same on every rank."""
    model.eval()
    hidden = model(input_ids, attention_mask)
    return F.normalize(mean_pool(hidden, attention_mask), p=2, dim=-1)
