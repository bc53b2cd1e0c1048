"""raytp models holding this rank's part of the reference models' own weights, so that
the raytp contenders compute the same function as the plain and PyTorch-TP ones.

Name map (reference -> raytp): ``w1``/``w2`` -> ``fc_in``/``fc_out`` (MLP);
``attention.{wq,wk,wv}`` -> ``attn.qkv`` (fused [Q | K | V]), ``attention.wo`` ->
``attn.proj``, ``feed_forward.{w1,w3}`` -> ``mlp.fc_in`` (fused [gate | up]),
``feed_forward.w2`` -> ``mlp.fc_out``, ``attention_norm``/``ffn_norm`` ->
``attn_norm``/``mlp_norm`` (block); ``tok_embeddings`` -> ``embed``, ``norm`` ->
``norm``, ``output`` -> ``lm_head`` (GPT).
"""

from __future__ import annotations

import torch
from torch import nn

import raytp.nn
from raytp.bench import reference
from raytp.bench.workloads import BlockWorkload, GPTWorkload, MLPWorkload
from raytp.mesh import DeviceMesh
from raytp.models.config import GPTConfig
from raytp.models.gpt import GPT, Block
from raytp.nn import ParallelMLP
from raytp.random import RNGTracker


class Skip(Exception):
    """A contender's prerequisite is missing on this host (no GPU, no CuPy, no option)."""


def _set_overlap(module: nn.Module, overlap: bool) -> nn.Module:
    """Set the overlap explicitly either way: raytp's default depends on the device."""
    return raytp.nn.set_overlap(module, overlap)


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def raytp_mlp(ref: reference.MLP, w: MLPWorkload, mesh: DeviceMesh, overlap: bool) -> ParallelMLP:
    mlp = ParallelMLP(w.hidden, w.ffn, mesh=mesh, activation="gelu", bias=False,
                      device=ref.w1.weight.device, dtype=ref.w1.weight.dtype)
    with torch.no_grad():
        mlp.fc_in.load_full_(ref.w1.weight)
        mlp.fc_out.load_full_(ref.w2.weight)
    return _set_overlap(mlp, overlap)


def gpt_config(w: BlockWorkload | GPTWorkload, dtype: torch.dtype, *,
               sequence_parallel: bool = False) -> GPTConfig:
    """raytp's Llama-style config for a block or GPT workload (a block's vocabulary and
    layer count are unused)."""
    is_gpt = isinstance(w, GPTWorkload)
    return GPTConfig(
        vocab_size=w.vocab_size if is_gpt else 8, n_layers=w.n_layers if is_gpt else 1,
        n_heads=w.n_heads, n_kv_heads=w.n_kv_heads, d_model=w.d_model, d_ff=w.ffn,
        max_seq_len=w.seq_len if is_gpt else w.tokens, norm="rmsnorm", activation="swiglu",
        positions="rope", tie_embeddings=False, bias=False, sequence_parallel=sequence_parallel,
        dtype=dtype_name(dtype), rope_theta=w.rope_theta, norm_eps=w.norm_eps)


@torch.no_grad()
def load_block_(block: Block, ref: reference.Block) -> Block:
    a, f = ref.attention, ref.feed_forward
    block.attn_norm.weight.copy_(ref.attention_norm.weight)
    block.attn.qkv.load_full_(torch.cat([a.wq.weight, a.wk.weight, a.wv.weight]))
    block.attn.proj.load_full_(a.wo.weight)
    block.mlp_norm.weight.copy_(ref.ffn_norm.weight)
    block.mlp.fc_in.load_full_(torch.cat([f.w1.weight, f.w3.weight]))
    block.mlp.fc_out.load_full_(f.w2.weight)
    return block


def raytp_block(ref: reference.Block, w: BlockWorkload, mesh: DeviceMesh, overlap: bool,
                seed: int) -> Block:
    config = gpt_config(w, ref.attention.wq.weight.dtype, sequence_parallel=w.sequence_parallel)
    config.check_tp(mesh.tp_size)
    device = ref.attention.wq.weight.device
    block = Block(config, mesh, RNGTracker(seed, mesh.tp_rank, device), device)
    return _set_overlap(load_block_(block, ref), overlap)


@torch.no_grad()
def raytp_gpt(ref: reference.GPT, w: GPTWorkload, mesh: DeviceMesh, overlap: bool) -> GPT:
    model = gpt_config(w, ref.output.weight.dtype).build(mesh, device=ref.output.weight.device)
    model.embed.load_full_(ref.tok_embeddings.weight)
    for layer, ref_layer in zip(model.layers, ref.layers, strict=True):
        load_block_(layer, ref_layer)
    model.norm.weight.copy_(ref.norm.weight)
    model.lm_head.load_full_(ref.output.weight)
    return _set_overlap(model, overlap)
