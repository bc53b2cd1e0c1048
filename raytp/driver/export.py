"""The driver's part of ``cluster.export_hf``: refuse, before any rank work, a model raytp
cannot write as a Hugging Face checkpoint, and complete the ranks' export with what the
source checkpoint had besides weights (its special-token ids and tokenizer files)."""

from __future__ import annotations

import shutil
from pathlib import Path

from raytp.checkpoint.files import read_json, write_json
from raytp.models.families import export_family_of
from raytp.models.hf import Pretrained

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                   "merges.txt", "tokenizer.model", "added_tokens.json")
TOKEN_IDS = ("bos_token_id", "eos_token_id", "pad_token_id")


def check_exportable(spec) -> None:
    """A TypeError for a plain module (raytp cannot name its weights in a Hugging Face
    layout), a ValueError naming the config's fields for a raytp model no exported
    family computes (:func:`raytp.models.families.export_family_of`)."""
    model = spec.model
    if not hasattr(model, "build"):
        name = getattr(model, "__name__", type(model).__name__)
        raise TypeError(
            f"export_hf() writes raytp's GPT-2 and Llama models as Hugging Face checkpoints (a cluster "
            f"built from a raytp.models.GPTConfig or raytp.models.pretrained(path) of one); this cluster's "
            f"model comes from {name}, a plain module: save it with cluster.save(path) (sharded, loadable "
            f"at any tp) or take its parameters with cluster.gather(name)")
    export_family_of(model.config() if isinstance(model, Pretrained) else model)


def source_directory(spec) -> Path | None:
    """The Hugging Face directory the model was loaded from, if it was."""
    if not isinstance(spec.model, Pretrained):
        return None
    path = Path(spec.model.path)
    return path if path.is_dir() else path.parent


def complete_from_source(staging: Path, source: Path | None) -> list[str]:
    """Copy the source's special-token ids into the exported config.json and its tokenizer
    files beside it; returns the names of the files copied."""
    if source is None or not (source / "config.json").is_file():
        return []
    hf = read_json(source / "config.json")
    ids = {k: hf[k] for k in TOKEN_IDS if hf.get(k) is not None}
    if ids:
        write_json(staging / "config.json", {**read_json(staging / "config.json"), **ids})
    copied = [name for name in TOKENIZER_FILES if (source / name).is_file()]
    for name in copied:
        shutil.copy2(source / name, staging / name)
    return copied
