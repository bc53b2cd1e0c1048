"""The transformers contenders of ``raytp bench decode``, in the driver's process.

- ``hf-dynamic``: ``generate`` with its default dynamic cache.
- ``hf-static``: ``generate(cache_implementation="static")``. On CUDA, transformers 5
  compiles the decode forward by itself for a static cache (``torch.compile`` with the
  model's ``CompileConfig``, by default mode ``"reduce-overhead"``: CUDA graphs); the
  warm-up is one whole untimed pass, which compiles and records every shape the timed
  passes use. The cache is sized for the scenario's longest prompt (``max_cache_len``
  where this transformers has it; it never shrinks between calls either way), so the
  batches of one scenario share one compiled graph. On CPU nothing is compiled.

Both are greedy with ``min_new_tokens = max_new_tokens``, prompts taken ``batch`` at a
time and left-padded. Per batch: a call generating 1 token (time to first token) and
one generating ``new_tokens`` (total); a decode step is (total - ttft) / (new_tokens - 1).
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from raytp.bench.decode import DecodeConfig, Scenario

HF_CONTENDERS = ("hf-dynamic", "hf-static")
PAD_ID = 0


def load_model(path: str | Path, config: DecodeConfig, device: torch.device):
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(path, dtype=config.torch_dtype).to(device).eval()


def left_pad(prompts, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T_max) ids and attention mask, each prompt right-aligned."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), PAD_ID, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt):] = torch.tensor(prompt)
        mask[row, width - len(prompt):] = 1
    return ids.to(device), mask.to(device)


class HFContender:
    """One of :data:`HF_CONTENDERS` on a loaded ``LlamaForCausalLM``."""

    def __init__(self, name: str, model, device: torch.device):
        if name not in HF_CONTENDERS:
            raise ValueError(f"unknown transformers contender {name!r}; one of {HF_CONTENDERS}")
        self.name, self.model, self.device = name, model, device
        self.static = name == "hf-static"

    @property
    def compiled(self) -> bool:
        return self.static and self.device.type == "cuda"

    def _options(self, scenario: Scenario) -> dict:
        if not self.static:
            return {}
        options = {"cache_implementation": "static"}
        if hasattr(self.model.generation_config, "max_cache_len"):
            options["max_cache_len"] = max(len(p) for p in scenario.prompts) + scenario.new_tokens - 1
        return options

    def _generate(self, chunk, new_tokens: int, options: dict) -> tuple[list[list[int]], float]:
        ids, mask = left_pad(chunk, self.device)
        _sync(self.device)
        start = time.perf_counter()
        out = self.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens,  # no_grad
                                  min_new_tokens=new_tokens, do_sample=False, pad_token_id=PAD_ID, **options)
        _sync(self.device)
        seconds = time.perf_counter() - start
        return out[:, ids.shape[1]:].tolist(), seconds

    def warm_up(self, scenario: Scenario) -> float:
        """Untimed: the whole scenario for the static cache (compiles), else one short call."""
        start = time.perf_counter()
        if self.static:
            self.measure(scenario)
        else:
            self._generate(scenario.chunks()[0], 2, {})
        return time.perf_counter() - start

    def measure(self, scenario: Scenario) -> dict:
        """One timed pass over the scenario's prompts."""
        options, tokens, firsts, totals = self._options(scenario), [], [], []
        for chunk in scenario.chunks():
            firsts.append(self._generate(chunk, 1, options)[1])
            ids, total = self._generate(chunk, scenario.new_tokens, options)
            if any(len(t) != scenario.new_tokens for t in ids):
                raise RuntimeError(f"{self.name} stopped before {scenario.new_tokens} tokens")
            tokens += ids
            totals.append(total)
        # a batch's prompts wait for the batches before it
        sizes = [len(chunk) for chunk in scenario.chunks()]
        ttfts = [sum(totals[:i]) + first for i, first in enumerate(firsts) for _ in range(sizes[i])]
        steps = len(totals) * (scenario.new_tokens - 1)
        return {"tokens": tokens, "wall_s": sum(totals), "ttft_s": sum(ttfts) / len(ttfts),
                "first_token_calls_s": sum(firsts), "ms_per_step": (sum(totals) - sum(firsts)) / steps * 1e3,
                "tokens_per_s": scenario.tokens / sum(totals), "decode_steps": steps}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
