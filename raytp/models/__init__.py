"""Model families built from :mod:`raytp.nn`."""

from raytp.models.config import GPTConfig
from raytp.models.gpt import GPT

__all__ = ["GPT", "GPTConfig"]
