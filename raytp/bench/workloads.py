"""What ``raytp bench`` measures: the workloads, their sizes and their model FLOPs.

Every workload is a frozen dataclass that pickles to the ranks. Its ``flops()`` is the
model FLOPs of one timed step (forward and backward, and the optimizer for the GPT,
whose FLOPs are not counted), written out per workload below; TFLOP/s and MFU are
computed from it, never from what a contender actually executes.
"""

from __future__ import annotations

from dataclasses import dataclass

KINDS = ("mlp", "block", "gpt")


@dataclass(frozen=True)
class MLPWorkload:
    """The MLP block ``w2(gelu(w1 x))``, no bias, on input (1, tokens, hidden) that needs
    its gradient (as in the middle of a model), forward and backward.

    FLOPs: two GEMMs of hidden x ffn, each 2 * tokens * hidden * ffn forward and twice
    that backward (input and weight gradients): ``12 * tokens * hidden * ffn``, i.e.
    ``6 * params * tokens``.
    """

    hidden: int
    ffn: int
    tokens: int
    kind: str = "mlp"

    @property
    def name(self) -> str:
        return f"mlp-{self.hidden}"

    @property
    def label(self) -> str:
        return f"MLP {self.hidden}/{self.ffn}, {self.tokens} tokens"

    @property
    def size(self) -> int:
        return self.hidden

    def flops(self) -> float:
        return 12.0 * self.tokens * self.hidden * self.ffn


@dataclass(frozen=True)
class BlockWorkload:
    """One Llama-style pre-norm block (RMSNorm, GQA attention with RoPE and causal SDPA,
    SwiGLU MLP), no bias, on input (1, tokens, d_model) that needs its gradient, forward
    and backward; ``sequence_parallel`` splits the residual stream along the sequence.

    FLOPs: ``6 * P * tokens`` for the matmul weights ``P = d * (n_heads + 2 n_kv_heads)
    * head_dim + n_heads * head_dim * d + 3 * d * ffn``, plus attention's scores and
    weighted sum, ``4 * tokens^2 * n_heads * head_dim`` forward and twice that backward:
    ``12 * tokens^2 * d`` (PaLM's count, as :meth:`raytp.models.GPTConfig.flops_per_token`;
    the causal mask is not discounted).
    """

    d_model: int
    n_heads: int
    n_kv_heads: int
    ffn: int
    tokens: int
    sequence_parallel: bool = False
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    kind: str = "block"

    @property
    def name(self) -> str:
        return f"block-{self.tokens}" + ("-sp" if self.sequence_parallel else "")

    @property
    def label(self) -> str:
        return (f"block d{self.d_model} {self.n_heads}h/{self.n_kv_heads}kv ffn {self.ffn}, "
                f"{self.tokens} tokens" + (", SP" if self.sequence_parallel else ""))

    @property
    def size(self) -> int:
        return self.tokens

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    def matmul_params(self) -> int:
        d, hd = self.d_model, self.head_dim
        return d * (self.n_heads + 2 * self.n_kv_heads) * hd + self.n_heads * hd * d + 3 * d * self.ffn

    def flops(self) -> float:
        attention = 12.0 * self.tokens ** 2 * self.n_heads * self.head_dim
        return 6.0 * self.matmul_params() * self.tokens + attention


@dataclass(frozen=True)
class GPTWorkload:
    """A Llama-style decoder's training step: forward, cross-entropy, backward, AdamW.

    FLOPs: ``tokens * (6 * P + 12 * n_layers * d_model * seq_len)`` with ``P`` the
    matmul weights (attention, MLP, LM head; not the embedding lookup or norms) and
    ``tokens = batch * seq_len`` (:meth:`raytp.models.GPTConfig.flops_per_token`).
    The optimizer's FLOPs are not counted.
    """

    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    ffn: int
    vocab_size: int
    seq_len: int
    batch: int
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    kind: str = "gpt"

    @property
    def name(self) -> str:
        return "gpt"

    @property
    def label(self) -> str:
        billions = self.params() / 1e9
        return (f"GPT {billions:.2f}B (d{self.d_model} x{self.n_layers}, {self.n_heads}h/"
                f"{self.n_kv_heads}kv, ffn {self.ffn}, vocab {self.vocab_size}), "
                f"{self.batch}x{self.seq_len} tokens, AdamW")

    @property
    def size(self) -> int:
        return self.d_model

    @property
    def tokens(self) -> int:
        return self.batch * self.seq_len

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    def layer_params(self) -> int:
        d, hd = self.d_model, self.head_dim
        return d * (self.n_heads + 2 * self.n_kv_heads) * hd + self.n_heads * hd * d + 3 * d * self.ffn

    def matmul_params(self) -> int:
        return self.n_layers * self.layer_params() + self.vocab_size * self.d_model

    def params(self) -> int:
        """All parameters: matmul weights, the embedding and the norms."""
        norms = (2 * self.n_layers + 1) * self.d_model
        return self.matmul_params() + self.vocab_size * self.d_model + norms

    def flops(self) -> float:
        attention = 12.0 * self.n_layers * self.d_model * self.seq_len
        return self.tokens * (6.0 * self.matmul_params() + attention)


Workload = MLPWorkload | BlockWorkload | GPTWorkload


def _blocks(d, heads, kv, ffn, tokens_list) -> list[BlockWorkload]:
    return [BlockWorkload(d, heads, kv, ffn, t, sp) for t in tokens_list for sp in (False, True)]


def full_workloads() -> list[Workload]:
    """The sizes of GitHub issue 5 (bf16 on GPU). The GPT has 1.14B parameters; with
    bf16 params, grads and AdamW state that is 9.1 GB on one GPU, 4.6 GB per rank at tp=2."""
    return [
        MLPWorkload(2048, 8192, 2048),
        MLPWorkload(4096, 16384, 4096),
        MLPWorkload(8192, 32768, 8192),
        *_blocks(4096, 32, 8, 14336, (2048, 8192)),
        GPTWorkload(d_model=2048, n_layers=16, n_heads=16, n_kv_heads=8, ffn=8192, vocab_size=32000,
                    seq_len=2048, batch=4),
    ]


def quick_workloads() -> list[Workload]:
    """Tiny shapes of the same kinds, for CPU smoke tests (float32, tp up to 4)."""
    return [
        MLPWorkload(32, 128, 16),
        MLPWorkload(64, 256, 32),
        *_blocks(64, 8, 4, 128, (16,)),
        GPTWorkload(d_model=64, n_layers=2, n_heads=8, n_kv_heads=4, ffn=128, vocab_size=128,
                    seq_len=16, batch=2),
    ]


def select(names: list[str] | None = None, sizes: list[int] | None = None,
           quick: bool = False) -> list[Workload]:
    """The workloads named (kinds ``mlp``, ``block``, ``gpt`` or exact names such as
    ``mlp-8192``, ``block-2048-sp``), whose ``size`` (MLP hidden, block tokens, GPT
    d_model) is in ``sizes`` when given. ``None`` means all."""
    pool = quick_workloads() if quick else full_workloads()
    known = set(KINDS) | {w.name for w in pool}
    unknown = sorted(set(names or ()) - known)
    if unknown:
        raise ValueError(f"unknown workloads {unknown}; choose from {sorted(known)}")
    chosen = [w for w in pool if names is None or w.kind in names or w.name in names]
    if sizes:
        chosen = [w for w in chosen if w.size in sizes or w.kind == "gpt"]
    if not chosen:
        raise ValueError(f"no workload left for names={names}, sizes={sizes}")
    return chosen
