"""Checkpoints: Hugging Face weights read slice by slice (:mod:`raytp.models.hf`), and
sharded checkpoints of training state that load at any tp (:mod:`.sharded`)."""

from raytp.checkpoint.files import CheckpointError
from raytp.checkpoint.sharded import read_index
from raytp.checkpoint.training import load, load_rank, save, save_rank

__all__ = ["CheckpointError", "load", "load_rank", "read_index", "save", "save_rank"]
