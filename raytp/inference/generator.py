"""What a rank generates with: the engine's life on an inference rank and on a training
rank, the modes a generation runs in, and :func:`generate` for a script that drives the
ranks itself (``torchrun``).

:class:`Generator` is what :meth:`raytp.engine.RankEngine.generate_steps` calls. On an
inference-only rank the cache is sized and allocated when the rank is built
(:meth:`Generator.prepare`) and kept, with its CUDA graphs, for every later generation.
On a training rank it is made when a generation starts, sized for that generation's
prompts unless ``max_batch`` / ``max_len`` are given, and freed when the generation
ends, so that training gets its memory back. Each call runs in ``torch.inference_mode``
with the model in eval mode and without sequence parallelism, and puts the model back
as it was: the optimizer's state, the gradients and every RNG stream are untouched
(sampling draws no random numbers, see :mod:`raytp.inference.sampling`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from raytp.inference.cache import CacheShape, size_cache
from raytp.inference.engine import GenerationEngine
from raytp.inference.sampling import SamplingParams
from raytp.inference.scheduler import Request, make_requests

log = logging.getLogger(__name__)

STEPS_PER_CALL = 8  # decode steps per generate_steps call of the driver loops
SIZES = ("max_batch", "max_len", "kv_cache_bytes")  # what a build and a generation report of the cache


def _positive_or_none(name: str, value) -> None:
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
        raise ValueError(f"{name}={value!r} must be a positive integer or None (sized from memory)")


@dataclass(frozen=True)
class GenerationOptions:
    """The KV cache and decode path of a rank (the BuildSpec options of the same names):
    ``max_batch`` slots of ``max_len`` positions (None: sized, see
    :func:`raytp.inference.cache.size_cache`), decode steps as CUDA graphs (``cuda_graphs``,
    ignored on CPU)."""

    max_batch: int | None = None
    max_len: int | None = None
    cuda_graphs: bool = True

    def __post_init__(self):
        _positive_or_none("max_batch", self.max_batch)
        _positive_or_none("max_len", self.max_len)
        if not isinstance(self.cuda_graphs, bool):
            raise ValueError(f"cuda_graphs={self.cuda_graphs!r} must be True or False")


def generative(model) -> bool:
    """Whether :mod:`raytp.inference` can decode with ``model`` (a raytp GPT)."""
    return callable(getattr(model, "forward_at", None)) and hasattr(model, "lm_head")


class Generator:
    """Generation on one rank of ``mesh`` with ``model`` (see the module docstring);
    ``keep``: keep the cache between generations (an inference-only rank)."""

    def __init__(self, model, mesh, options: GenerationOptions | None = None, *, keep: bool = True):
        self.model, self.mesh = model, mesh
        self.options, self.keep = options or GenerationOptions(), keep
        self.engine: GenerationEngine | None = None
        self.stats: dict[str, Any] | None = None  # of the current (or last) generation

    def check(self) -> None:
        if not generative(self.model):
            raise ValueError(f"generation needs a raytp GPT model (GPTConfig or pretrained(path)); this "
                             f"rank holds a {type(self.model).__name__}")

    def _shape(self, need: tuple[int, int] | None) -> CacheShape:
        config, tp, options = self.model.config, self.mesh.tp_size, self.options
        base = CacheShape(config.n_layers, max(config.n_kv_heads // tp, 1), config.head_dim,
                          self.model.embed.weight.dtype)
        max_batch, max_len = options.max_batch, options.max_len
        if need is not None:  # a training rank: as much as this generation needs
            max_batch, max_len = max_batch or need[0], max_len or need[1]
        return size_cache(base, config.max_seq_len, self.mesh.device, max_batch, max_len)

    def prepare(self, need: tuple[int, int] | None = None) -> None:
        """Size and allocate the cache (for an inference rank, at build)."""
        self.check()
        self.free()
        with torch.inference_mode():
            self.engine = GenerationEngine(self.model, self.mesh, self._shape(need), self.options.cuda_graphs)
        s = self.engine.shape
        log.info("KV cache: %d slots x %d positions, %.1f MiB", s.max_batch, s.max_len, s.nbytes / 2**20)

    def free(self) -> None:
        """Drop the cache and its graphs."""
        if self.engine is not None:
            self.engine = None
            if self.mesh.device.type == "cuda":
                torch.cuda.empty_cache()

    def describe(self) -> dict[str, Any] | None:
        """What the driver checks prompts against and reports: None for a model that does
        not generate; else ``vocab_size``, ``max_seq_len`` and the cache's ``max_batch``,
        ``max_len``, ``kv_cache_bytes`` (a training rank: the options given, None for
        those sized at each generation, and ``kv_cache_bytes`` None)."""
        if not generative(self.model):
            return None
        config, engine = self.model.config, self.engine
        if engine is not None:
            sizes = {"max_batch": engine.shape.max_batch, "max_len": engine.shape.max_len,
                     "kv_cache_bytes": engine.cache.nbytes}
        else:
            sizes = {"max_batch": self.options.max_batch, "max_len": self.options.max_len,
                     "kv_cache_bytes": None}
        return {"vocab_size": config.vocab_size, "max_seq_len": config.max_seq_len, **sizes}

    def steps(self, requests: Sequence[Request], max_steps: int, *, start: bool = False,
              cuda_graphs: bool | None = None, need: tuple[int, int] | None = None,
              cancel: Sequence[int] = ()) -> dict[str, Any]:
        """One call of a generation: ``start`` begins a new one (dropping what is left of
        the last; on a training rank the cache is made for ``need`` = (slots, positions)),
        then :meth:`GenerationEngine.steps` (``cancel``: indices of requests to drop first);
        a ``start`` without requests only ends the last one (a stream abandoned). The result
        adds ``sizes`` (the cache's)."""
        self.check()
        if start and not requests:
            self._end()
        elif start and (self.engine is None or not self.keep):
            self.prepare(need)
        if self.engine is None:  # a training rank whose generation ended
            return {"events": [], "first_token_at": {}, "idle": True, "stats": self.stats, "sizes": None}
        if start:
            self.engine.start(cuda_graphs)
        with self._modes():
            result = self.engine.steps(requests, max_steps, cancel)
        self.stats = result["stats"]
        result["sizes"] = {k: v for k, v in self.describe().items() if k in SIZES}
        if result["idle"]:
            self._end()
        return result

    def _end(self) -> None:
        """The generation is over: a training rank frees its cache; an inference rank keeps it."""
        if self.engine is not None:
            self.engine.start()  # drops any requests left
        if not self.keep:
            self.free()

    @contextmanager
    def _modes(self):
        from raytp.models.gpt import sequence_parallel_off

        was_training = self.model.training
        self.model.eval()
        try:
            with torch.inference_mode(), sequence_parallel_off(self.model):
                yield
        finally:
            self.model.train(was_training)


def generate(generator: Generator, prompts, sampling: SamplingParams, *,
             cuda_graphs: bool | None = None) -> list[list[int]]:
    """Each prompt's new ids on this rank, in order (the same on every rank of the TP
    group, which must all call it with the same arguments): the driver loop of
    :meth:`raytp.TPCluster.generate` without Ray, for a ``torchrun`` script
    (``generate(engine.generation, prompts, sampling)``). Prompts as in ``TPCluster.generate``;
    ``generator.stats`` are the generation's afterwards."""
    generator.check()
    info = generator.describe()
    requests = make_requests(prompts, sampling, vocab_size=info["vocab_size"],
                             max_seq_len=info["max_seq_len"], max_len=info["max_len"])
    out: list[list[int]] = [[] for _ in requests]
    if not requests:
        return out
    need = (len(requests), max(r.positions for r in requests))
    result = generator.steps(requests, STEPS_PER_CALL, start=True, cuda_graphs=cuda_graphs, need=need)
    while True:
        for index, token in result["events"]:
            out[index].append(token)
        if result["idle"]:
            return out
        result = generator.steps([], STEPS_PER_CALL)
