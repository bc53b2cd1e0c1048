"""Generation on the ranks: a static KV cache of slots, continuous batching, sampling on
the device, and the decode step as a CUDA graph. No Ray: the driver
(:mod:`raytp.driver.generation`) and ``torchrun`` scripts (:func:`generate`) drive it
through :meth:`raytp.engine.RankEngine.generate_steps` / :class:`Generator`.

- :mod:`~raytp.inference.sampling`: :class:`SamplingParams`, Gumbel-max sampling from a
  counter-based hash, the token chosen from vocabulary-parallel logits;
- :mod:`~raytp.inference.cache`: the slot KV cache and its sizing;
- :mod:`~raytp.inference.scheduler`: requests, their checks, continuous batching;
- :mod:`~raytp.inference.graphs`: the CUDA graphs of the decode step;
- :mod:`~raytp.inference.engine`: prefill and decode steps;
- :mod:`~raytp.inference.generator`: the engine's life on a rank, and :func:`generate`.
"""

from raytp.inference.cache import CacheShape, SlotCache
from raytp.inference.engine import GenerationEngine
from raytp.inference.generator import GenerationOptions, Generator, generate
from raytp.inference.sampling import SamplingParams
from raytp.inference.scheduler import Request, make_requests

__all__ = ["CacheShape", "GenerationEngine", "GenerationOptions", "Generator", "Request", "SamplingParams",
           "SlotCache", "generate", "make_requests"]
