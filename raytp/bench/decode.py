"""The workload of ``raytp bench decode``: a Llama-style model with random weights saved
as a Hugging Face checkpoint, the prompts of each scenario, and the bandwidth floor.

Scenarios (the issue's): ``batch-1`` and ``batch-32`` (equal prompts of ``prompt_len``
tokens, ``new_tokens`` each) and ``ragged-100`` (100 prompts of seeded lengths in
``[ragged_min, ragged_max]`` through ``slots`` cache slots). Every sequence generates
exactly ``new_tokens`` (no stop ids), so every contender does the same work.

The floor of a decode step is the bytes of the weights over the device's memory
bandwidth: at batch 1 a step cannot be faster than reading every weight once.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

# Datasheet HBM bandwidth (bytes/s), used only where the copy cannot be measured.
DATASHEET_BANDWIDTH = {"H200": 4.8e12, "H100": 3.35e12, "A100": 2.0e12, "L40S": 0.864e12}


@dataclass(frozen=True)
class DecodeConfig:
    """The model (Llama-style, untied embeddings) and the scenarios' sizes."""

    vocab_size: int = 32000
    d_model: int = 2048
    n_layers: int = 22
    n_heads: int = 32
    n_kv_heads: int = 4
    d_ff: int = 5632
    dtype: str = "bfloat16"
    prompt_len: int = 128
    new_tokens: int = 256
    batches: tuple[int, ...] = (1, 32)
    ragged_prompts: int = 100
    ragged_min: int = 16
    ragged_max: int = 512
    slots: int = 32
    init_std: float = 0.02
    seed: int = 0

    def __post_init__(self):
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff", "prompt_len",
                     "new_tokens", "ragged_prompts", "ragged_min", "ragged_max", "slots"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"DecodeConfig: {name}={value!r} must be a positive integer")
        if self.d_model % self.n_heads or self.n_heads % self.n_kv_heads:
            raise ValueError(f"DecodeConfig: n_heads={self.n_heads} must divide d_model={self.d_model} "
                             f"and be a multiple of n_kv_heads={self.n_kv_heads}")
        if not self.ragged_min <= self.ragged_max:
            raise ValueError(f"DecodeConfig: ragged_min={self.ragged_min} > ragged_max={self.ragged_max}")
        if not self.batches or max(self.batches) > self.slots:
            raise ValueError(f"DecodeConfig: batches={self.batches} must be non-empty and fit "
                             f"slots={self.slots}")
        if self.new_tokens < 2:
            raise ValueError(f"DecodeConfig: new_tokens={self.new_tokens} must be >= 2 (a decode step after "
                             "the first token)")

    @property
    def max_len(self) -> int:
        """The longest sequence of any scenario: the cache length each slot needs."""
        return max(self.prompt_len, self.ragged_max) + self.new_tokens

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    def weight_bytes(self) -> int:
        """Bytes of every parameter (embedding, blocks, final norm, LM head)."""
        head_dim = self.d_model // self.n_heads
        attention = 2 * self.d_model * self.d_model + 2 * self.d_model * self.n_kv_heads * head_dim
        block = attention + 3 * self.d_model * self.d_ff + 2 * self.d_model  # + two RMSNorm weights
        params = 2 * self.vocab_size * self.d_model + self.n_layers * block + self.d_model
        return params * self.torch_dtype.itemsize


LLAMA_1B = DecodeConfig()
QUICK = DecodeConfig(vocab_size=256, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=128,
                     dtype="float32", prompt_len=8, new_tokens=8, batches=(1, 4), ragged_prompts=10,
                     ragged_min=2, ragged_max=12, slots=4, init_std=0.2)


@dataclass(frozen=True)
class Scenario:
    """Prompts (id lists) generated ``new_tokens`` each; batch-at-a-time contenders take
    them ``batch`` at a time (left-padded), the others through their slots."""

    name: str
    prompts: tuple[tuple[int, ...], ...]
    new_tokens: int
    batch: int

    @property
    def tokens(self) -> int:
        return len(self.prompts) * self.new_tokens

    def chunks(self) -> list[tuple[tuple[int, ...], ...]]:
        return [self.prompts[i:i + self.batch] for i in range(0, len(self.prompts), self.batch)]


def scenarios(config: DecodeConfig) -> list[Scenario]:
    """``batch-B`` for each batch size, then ``ragged-N``; the same seeded ids on every call."""
    rng = np.random.default_rng(config.seed)

    def ids(n: int) -> tuple[int, ...]:
        return tuple(int(i) for i in rng.integers(1, config.vocab_size, n))

    out = [Scenario(f"batch-{b}", tuple(ids(config.prompt_len) for _ in range(b)), config.new_tokens, b)
           for b in config.batches]
    lengths = rng.integers(config.ragged_min, config.ragged_max + 1, config.ragged_prompts)
    out.append(Scenario(f"ragged-{config.ragged_prompts}", tuple(ids(int(n)) for n in lengths),
                        config.new_tokens, config.slots))
    return out


def hf_config(config: DecodeConfig):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=config.vocab_size, hidden_size=config.d_model,
                       intermediate_size=config.d_ff, num_hidden_layers=config.n_layers,
                       num_attention_heads=config.n_heads, num_key_value_heads=config.n_kv_heads,
                       max_position_embeddings=max(2048, config.max_len),
                       initializer_range=config.init_std, tie_word_embeddings=False, bos_token_id=None,
                       eos_token_id=None, pad_token_id=None)


def save_random_llama(config: DecodeConfig, directory: str | Path, device: torch.device) -> Path:
    """``LlamaForCausalLM(config).save_pretrained(directory)`` with seeded random weights in
    ``config.dtype`` (initialized on ``device``: a 1.1B init on a CPU takes long)."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(config.seed)
    with torch.device(device):
        model = LlamaForCausalLM(hf_config(config))
    model.to(config.torch_dtype).save_pretrained(directory)
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return Path(directory)


def memory_bandwidth(device: torch.device) -> dict:
    """Bytes/s of a large device-to-device copy (read + write counted), with the source
    named; the datasheet figure where known."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    datasheet = next((bw for key, bw in DATASHEET_BANDWIDTH.items() if key in name), None)
    nbytes = 2**30 if device.type == "cuda" else 2**26
    try:
        measured = _copy_bandwidth(device, nbytes)
    except RuntimeError as e:  # out of memory: fall back on the datasheet
        return {"bytes_per_s": datasheet, "source": f"datasheet ({type(e).__name__} measuring the copy)",
                "datasheet_bytes_per_s": datasheet}
    return {"bytes_per_s": measured, "source": f"measured: copy of {nbytes / 2**30:g} GiB, read + write",
            "datasheet_bytes_per_s": datasheet}


def _copy_bandwidth(device: torch.device, nbytes: int, repeats: int = 10) -> float:
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    _sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        dst.copy_(src)
    _sync(device)
    seconds = time.perf_counter() - start
    del src, dst
    return 2 * nbytes * repeats / seconds


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
