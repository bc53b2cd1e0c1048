"""A GPT-2 / Llama style decoder built from raytp's TP layers.

The model code does not know it is sharded: every layer takes the mesh and holds
its own slice, and the activations between layers are replicated (or split along
the sequence, under sequence parallelism). Parameter names follow Hugging Face
Llama where natural: ``embed``, ``pos_embed``, ``layers.{i}.attn_norm``,
``layers.{i}.attn.qkv``, ``layers.{i}.attn.proj``, ``layers.{i}.mlp_norm``,
``layers.{i}.mlp.fc_in``, ``layers.{i}.mlp.fc_out``, ``norm``, ``lm_head``.
"""

from __future__ import annotations

import math
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from raytp.comm import functional as cf
from raytp.mesh import DeviceMesh
from raytp.models.config import IGNORE_INDEX, GPTConfig
from raytp.models.sampling import next_token
from raytp.nn import (
    KVCache,
    LayerNorm,
    ParallelAttention,
    ParallelLMHead,
    ParallelMLP,
    PositionEmbedding,
    RMSNorm,
    VocabParallelEmbedding,
    rope_tables,
    vocab_parallel_cross_entropy,
)
from raytp.nn.kernels import KernelLayer
from raytp.params import materialize_, reset_parameters_
from raytp.random import RNGTracker, TPDropout


def _norm(config: GPTConfig, **layer) -> nn.Module:
    if config.norm == "rmsnorm":
        return RMSNorm(config.d_model, eps=config.norm_eps, **layer)
    return LayerNorm(config.d_model, eps=config.norm_eps, bias=config.bias, **layer)


class Block(nn.Module):
    """Pre-norm transformer block: ``x + attn(norm(x))``, then ``x + mlp(norm(x))``.

    Input and output (B, T, d_model), replicated; or (B, T / tp, d_model) under
    sequence parallelism. Residual dropout draws from the replicated RNG state, or
    the sharded one when the residual stream is split along the sequence.
    Collectives: forward two all-reduces, backward two (under sequence parallelism
    two all-gathers and two reduce-scatters each way).
    """

    def __init__(self, config: GPTConfig, mesh: DeviceMesh, rng: RNGTracker, device):
        super().__init__()
        c, sp = config, config.sequence_parallel
        layer = {"mesh": mesh, "sequence_parallel": sp, "device": device, "dtype": c.torch_dtype}
        # GPT-2 scales the init of the projections into the residual stream by 1 / sqrt(2 n_layers)
        stds = {"init_std": c.init_std, "out_init_std": c.init_std / math.sqrt(2 * c.n_layers)}
        self.attn_norm = _norm(c, **layer)
        self.attn = ParallelAttention(c.d_model, c.n_heads, c.n_kv_heads, bias=c.bias,
                                      dropout=c.dropout, rng=rng, **stds, **layer)
        self.mlp_norm = _norm(c, **layer)
        self.mlp = ParallelMLP(c.d_model, c.d_ff, activation=c.activation, bias=c.bias, **stds, **layer)
        self.dropout = TPDropout(c.dropout, rng, "sharded" if sp else "replicated")

    def forward(self, x: torch.Tensor, rope=None, kv_cache: KVCache | None = None) -> torch.Tensor:
        x = x + self.dropout(self.attn(self.attn_norm(x), rope, kv_cache))
        return x + self.dropout(self.mlp(self.mlp_norm(x)))


@contextmanager
def sequence_parallel_off(module: nn.Module):
    """Run ``module``'s layers without sequence parallelism inside the block: the same
    math, with all-reduces in place of the reduce-scatter / all-gather pairs. Decoding
    one token at a time cannot split the sequence. A mode, like ``eval()``; gradients
    of norms computed inside it are whole, not partial, so train outside it. The TP
    linear layers get a kernel of their non-sequence-parallel family (overlapped where
    theirs was) and their own kernel back after."""
    switched = [m for m in module.modules() if getattr(m, "sequence_parallel", False)]
    kernels = {m: m.kernel for m in switched if isinstance(m, KernelLayer)}
    for m in switched:
        m.sequence_parallel = False
    for m, kernel in kernels.items():
        m.kernel = m.kernel_family.choose(kernel.overlapped)
    try:
        yield
    finally:
        for m in switched:
            m.sequence_parallel = True
        for m, kernel in kernels.items():
            m.kernel = kernel


def _labels(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """(B, T) targets: ``batch["labels"]``, or the next input ids (the last ignored)."""
    ids, labels = batch["input_ids"], batch.get("labels")
    if labels is None:
        return F.pad(ids[:, 1:], (0, 1), value=IGNORE_INDEX)
    if labels.shape != ids.shape:
        raise ValueError(f"labels {tuple(labels.shape)} must have input_ids' shape {tuple(ids.shape)}")
    return labels


class GPT(nn.Module):
    """This rank's shard of a decoder-only transformer (see :class:`GPTConfig`).

    ``forward(input_ids (B, T))`` returns this rank's columns of the logits,
    (B, T, V_padded / tp). Built on the meta device, then materialized and
    initialized GPT-2 style (normal(0, init_std), residual projections scaled by
    1 / sqrt(2 n_layers), zero biases) by drawing each full weight and keeping this
    rank's slice: the same seed gives the same model at every tp. The dropout RNG
    (:class:`raytp.random.RNGTracker`) is seeded with ``dropout_seed``, or else with
    a number drawn from torch's default generator (the same on every rank). With
    ``init=False`` the parameters are left uninitialized, for a loader to fill
    (:func:`raytp.models.from_pretrained`).
    """

    def __init__(self, config: GPTConfig, mesh: DeviceMesh, *, device=None,
                 dropout_seed: int | None = None, init: bool = True):
        super().__init__()
        config.check_tp(mesh.tp_size)
        self.config, self.mesh = config, mesh
        device = torch.device(device) if device is not None else mesh.device
        drawn = int(torch.randint(0, 2**62, ()).item())  # drawn either way: weights do not depend on it
        self.rng = RNGTracker(drawn if dropout_seed is None else dropout_seed, mesh.tp_rank, device)
        self._build(config, mesh)
        materialize_(self, device)
        if init:
            self.reset_parameters()
        if config.positions == "rope":
            cos, sin = rope_tables(config.head_dim, config.max_seq_len, config.rope_theta,
                                   device=device, dtype=config.torch_dtype)
            self.register_buffer("rope_cos", cos, persistent=False)  # (max_seq_len, head_dim)
            self.register_buffer("rope_sin", sin, persistent=False)

    def _build(self, c: GPTConfig, mesh: DeviceMesh) -> None:
        sp = c.sequence_parallel
        layer = {"mesh": mesh, "sequence_parallel": sp, "device": "meta", "dtype": c.torch_dtype}
        self.embed = VocabParallelEmbedding(c.vocab_size, c.d_model, init_std=c.init_std, **layer)
        self.pos_embed = (PositionEmbedding(c.max_seq_len, c.d_model, init_std=c.init_std, **layer)
                          if c.positions == "learned" else None)
        self.embed_dropout = TPDropout(c.dropout, self.rng, "sharded" if sp else "replicated")
        self.layers = nn.ModuleList(Block(c, mesh, self.rng, "meta") for _ in range(c.n_layers))
        self.norm = _norm(c, **layer)
        self.lm_head = ParallelLMHead(c.d_model, c.vocab_size, tied_to=self.embed if c.tie_embeddings
                                      else None, init_std=c.init_std, **layer)

    def reset_parameters(self) -> None:
        """GPT-2's initialization: each layer draws its full tensors with the std it was
        built with, in module order, and keeps this rank's slice."""
        reset_parameters_(self)

    def new_kv_cache(self, max_len: int | None = None) -> list[KVCache]:
        """One empty :class:`KVCache` per layer, for up to ``max_len`` positions."""
        return [KVCache(max_len or self.config.max_seq_len) for _ in self.layers]

    def forward(self, input_ids: torch.Tensor, *, kv_cache: list[KVCache] | None = None) -> torch.Tensor:
        """(B, T) int64 ids -> (B, T, V_padded / tp) logits, this rank's vocabulary columns.

        With ``kv_cache`` (from :meth:`new_kv_cache`), the ids are the next T positions
        after those cached, and their keys and values are appended; the layers then run
        without sequence parallelism. Collectives: see :class:`Block`, plus the
        embedding's and the LM head's.
        """
        if kv_cache is None:
            return self._forward(input_ids, None)
        if len(kv_cache) != len(self.layers):
            raise ValueError(f"kv_cache has {len(kv_cache)} layers; the model has {len(self.layers)}")
        with sequence_parallel_off(self):
            return self._forward(input_ids, kv_cache)

    def _forward(self, input_ids, kv_cache):
        B, T = input_ids.shape
        start = kv_cache[0].length if kv_cache else 0
        if start + T > self.config.max_seq_len:
            raise ValueError(f"positions up to {start + T} exceed max_seq_len={self.config.max_seq_len}")
        if self.embed.sequence_parallel:  # False inside sequence_parallel_off()
            cf.check_divisible(T, self.mesh.tp_size, "sequence length T (sequence_parallel)")
        x = self.embed(input_ids)  # (B, T, d_model), or (B, T / tp, d_model) under sequence parallelism
        if self.pos_embed is not None:
            x = x + self.pos_embed(start, T)
        x = self.embed_dropout(x)
        rope = None
        if self.config.positions == "rope":
            rope = (self.rope_cos[start:start + T], self.rope_sin[start:start + T])  # (T, head_dim)
        for i, layer in enumerate(self.layers):
            x = layer(x, rope, kv_cache[i] if kv_cache else None)
        return self.lm_head(self.norm(x))  # (B, T, V_padded / tp)

    def forward_at(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_cache,
                   last: torch.Tensor | None = None) -> torch.Tensor:
        """(B, T) ids at (B, T) positions, each row its own, through one cache per layer
        (``kv_cache[i].attend(...)``, see :class:`~raytp.nn.ParallelAttention`) -> (B, T,
        V_padded / tp) logits; with ``last`` (B,), the logits of position ``last[b]`` of
        each row only, (B, V_padded / tp) (the LM head runs on those rows alone).

        What :mod:`raytp.inference` decodes with: prompts of different lengths prefilled
        together, slots decoded at their own positions. Runs without sequence parallelism
        (inside :func:`sequence_parallel_off`). Collectives: as :meth:`forward`.
        """
        if self.embed.sequence_parallel:
            raise RuntimeError("forward_at() runs without sequence parallelism: call it inside "
                               "sequence_parallel_off(model)")
        x = self.embed(input_ids)  # (B, T, d_model)
        if self.pos_embed is not None:
            x = x + self.pos_embed.at(positions)
        x = self.embed_dropout(x)
        rope = None
        if self.config.positions == "rope":
            rope = (self.rope_cos[positions], self.rope_sin[positions])  # (B, T, head_dim)
        for layer, cache in zip(self.layers, kv_cache, strict=True):
            x = layer(x, rope, cache)
        if last is not None:
            x = x[torch.arange(x.shape[0], device=x.device), last]  # (B, d_model)
        return self.lm_head(self.norm(x))

    def loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Mean next-token cross-entropy, the same scalar on every rank.

        ``batch["input_ids"]`` (B, T) int64; ``batch["labels"]`` (B, T), optional, is the
        target of each position (-100 to ignore it); by default the next input id, the
        last position ignored. The logits are never gathered.
        """
        ids, labels = batch["input_ids"], _labels(batch)
        return vocab_parallel_cross_entropy(self(ids), labels, comm=self.mesh.tp_comm,
                                            vocab_size=self.config.vocab_size, ignore_index=IGNORE_INDEX)

    def loss_tokens(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """How many tokens :meth:`loss` is the mean of: the labels that are not -100 (0-dim)."""
        return (_labels(batch) != IGNORE_INDEX).sum()

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, *, temperature: float = 0.0,
                 top_k: int | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
        """(B, T) prompt -> (B, T + max_new_tokens) ids, decoding with a KV cache.

        Greedy by default; with ``temperature > 0``, samples from the ``top_k`` most
        likely tokens. Every rank returns the same ids: the last position's logits are
        gathered over the vocabulary, and a sampled token is broadcast from TP rank 0.
        Collectives per token: the forward's, one all-gather, one broadcast when sampling.
        """
        T = input_ids.shape[1]
        if T + max_new_tokens > self.config.max_seq_len:
            raise ValueError(f"prompt {T} + max_new_tokens {max_new_tokens} exceeds "
                             f"max_seq_len={self.config.max_seq_len}")
        was_training = self.training
        self.eval()
        try:
            cache, ids = self.new_kv_cache(T + max_new_tokens), [input_ids]
            for _ in range(max_new_tokens):
                logits = self(ids[-1], kv_cache=cache)[:, -1]  # (B, V_padded / tp)
                ids.append(self._choose(logits, temperature, top_k, generator))
            return torch.cat(ids, dim=1)
        finally:
            self.train(was_training)

    def _choose(self, logits_shard, temperature, top_k, generator) -> torch.Tensor:
        tp = self.mesh.tp_comm
        logits = cf.all_gather(logits_shard, tp, -1) if tp.size > 1 else logits_shard
        token = next_token(logits[:, :self.config.vocab_size], temperature=temperature, top_k=top_k,
                           generator=generator)  # (B, 1)
        if temperature > 0 and tp.size > 1:
            tp.broadcast(token, src=0)  # rank 0's draw, whatever the others' generators hold
        return token

    def num_flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs per token of the full model (see :meth:`GPTConfig.flops_per_token`)."""
        return self.config.flops_per_token(seq_len)
