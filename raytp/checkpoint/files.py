"""Files of a checkpoint: safetensors read lazily, atomic writes, checksums.

Nothing here unpickles: tensors travel in safetensors files, metadata in JSON.
A file is written under a temporary name in its directory, fsynced and renamed; a
whole checkpoint is written into a staging directory beside its final path and
renamed into place when complete (:func:`commit_dir`), so a crash during a save
leaves the last good checkpoint as it was.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

_CHUNK = 1 << 20
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")  # torch.save / pickle files: never loaded


class CheckpointError(ValueError):
    """A checkpoint that cannot be read: missing, corrupt, truncated or of an unknown format."""


def refuse_pickle(paths: list[Path]) -> None:
    """Raise :class:`CheckpointError` explaining why, when ``paths`` names pickle files."""
    if paths:
        names = ", ".join(str(p) for p in paths)
        raise CheckpointError(
            f"{names}: a pickle checkpoint; raytp does not load it, because unpickling runs whatever "
            "code the file holds. Convert it once, where you trust it, to safetensors (e.g. "
            "transformers' `AutoModel.from_pretrained(dir).save_pretrained(dir, safe_serialization=True)`)")


def pickle_files(path: Path) -> list[Path]:
    """``path`` itself, or the files in the directory ``path``, that are pickles by their suffix."""
    if path.is_file():
        return [path] if path.suffix in PICKLE_SUFFIXES else []
    return sorted(p for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES) if path.is_dir() else []


def sha256_file(path: Path) -> str:
    """The sha256 of the file's bytes, read 1 MiB at a time."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_CHUNK):
            digest.update(block)
    return digest.hexdigest()


def file_record(path: Path) -> dict[str, Any]:
    """``{"sha256", "bytes"}`` of a written file, for the checkpoint's index."""
    return {"sha256": sha256_file(path), "bytes": path.stat().st_size}


def verify_file(path: Path, record: Mapping[str, Any]) -> None:
    """Raise :class:`CheckpointError` naming ``path`` unless its size and sha256 are the recorded ones."""
    if not path.is_file():
        raise CheckpointError(f"checkpoint file {path} is missing")
    size = path.stat().st_size
    if size != record["bytes"]:
        raise CheckpointError(f"checkpoint file {path} has {size} bytes; the index records "
                              f"{record['bytes']} (truncated or replaced?)")
    if sha256_file(path) != record["sha256"]:
        raise CheckpointError(f"checkpoint file {path} is corrupt: its sha256 differs from the index's")


def verify_files(directory: Path, records: Mapping[str, Mapping[str, Any]]) -> None:
    """:func:`verify_file` for every ``{name: record}`` in ``directory``: sizes first (cheap,
    so a missing or truncated file is named at once), then the hashes, in threads."""
    paths = {Path(directory) / name: record for name, record in records.items()}
    for path, record in paths.items():
        if not path.is_file() or path.stat().st_size != record["bytes"]:
            verify_file(path, record)
    with ThreadPoolExecutor(max_workers=min(8, len(paths) or 1)) as pool:
        list(pool.map(verify_file, paths, paths.values()))


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _replace_durably(tmp: Path, path: Path) -> None:
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def write_json(path: Path, value: Any) -> None:
    """Write ``value`` as JSON to ``path`` atomically (temporary name, fsync, rename)."""
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.write_text(json.dumps(value, indent=1, sort_keys=True))
    _replace_durably(tmp, path)


def write_safetensors(path: Path, tensors: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """Write ``tensors`` (contiguous CPU copies are made) to ``path`` atomically; return
    its :func:`file_record`."""
    from safetensors.torch import save_file

    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    save_file({k: t.detach().to("cpu").contiguous() for k, t in tensors.items()}, str(tmp),
              metadata={"format": "pt"})  # what transformers expects of a safetensors file
    _replace_durably(tmp, path)
    return file_record(path)


def read_json(path: Path) -> Any:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from None


def staging_dir(path: Path, nonce: str) -> Path:
    """The directory a checkpoint for ``path`` is written into before :func:`commit_dir`."""
    return path.parent / f"{path.name}.tmp-{nonce}"


def commit_dir(staging: Path, path: Path) -> None:
    """Move the complete checkpoint ``staging`` to ``path``. A previous checkpoint at
    ``path`` is moved aside first and deleted only once the new one is in place; a crash
    between the two renames leaves both, as ``path.old-*`` and ``path.tmp-*``."""
    _fsync_dir(staging)
    path.parent.mkdir(parents=True, exist_ok=True)
    old = None
    if path.exists():
        old = path.parent / f"{path.name}.old-{uuid.uuid4().hex[:12]}"
        os.rename(path, old)
    os.rename(staging, path)
    _fsync_dir(path.parent)
    if old is not None:
        shutil.rmtree(old)


class SafetensorsFiles:
    """Tensors by name over one or more safetensors files, opened lazily. ``slice(name)``
    reads nothing until indexed; only the indexed part is copied out of the file."""

    def __init__(self, weight_map: Mapping[str, Path]):
        self.weight_map = dict(weight_map)
        self._open: dict[Path, Any] = {}

    def __contains__(self, name: str) -> bool:
        return name in self.weight_map

    def _handle(self, name: str):
        from safetensors import safe_open

        if name not in self.weight_map:
            raise CheckpointError(f"tensor {name!r} is not in the checkpoint")
        path = self.weight_map[name]
        if path not in self._open:
            self._open[path] = safe_open(str(path), framework="pt")
        return self._open[path]

    def slice(self, name: str):
        return self._handle(name).get_slice(name)

    def tensor(self, name: str) -> torch.Tensor:
        """The whole tensor (for the small ones: scalars, RNG states)."""
        return self._handle(name).get_tensor(name)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.slice(name).get_shape())

    def close(self) -> None:
        for handle in self._open.values():
            handle.__exit__(None, None, None)
        self._open.clear()

    def __enter__(self) -> SafetensorsFiles:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @classmethod
    def of_files(cls, paths: list[Path]) -> SafetensorsFiles:
        """Every tensor of every file in ``paths`` (the headers are read, not the data)."""
        from safetensors import safe_open

        weight_map = {}
        for path in paths:
            with safe_open(str(path), framework="pt") as f:
                weight_map.update(dict.fromkeys(f.keys(), Path(path)))
        return cls(weight_map)
