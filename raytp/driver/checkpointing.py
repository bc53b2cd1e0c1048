"""The driver's part of checkpoints: a staging directory, the ranks' files, the index,
and the rename that makes a checkpoint complete. The ranks do the tensor work through
:mod:`raytp.checkpoint` (``RankEngine.save_shard`` / ``load_checkpoint`` / ``export_hf``).

The checkpoint path must be on a filesystem the driver and every rank see (one node,
or a shared mount).
"""

from __future__ import annotations

import logging
import shutil
import uuid
from pathlib import Path
from typing import Any

from raytp.checkpoint.files import commit_dir, staging_dir, verify_files
from raytp.checkpoint.sharded import read_index, write_index
from raytp.driver import export
from raytp.models.hf_export import export_dtype

log = logging.getLogger(__name__)


def _staged(cluster, path: str | Path, phase: str, method: str, *args) -> tuple[Path, Path, list]:
    """Run the engine's ``method(staging, *args)`` on every rank (for the driver's ``phase``),
    into a fresh staging directory beside ``path``; removed if a rank fails."""
    if not cluster.built:
        raise RuntimeError(f"{phase}() before build(): there is no model to save")
    path = Path(path).resolve()
    staging = staging_dir(path, uuid.uuid4().hex[:12])
    staging.mkdir(parents=True)
    try:
        return path, staging, cluster.run(method, str(staging), *args, phase=phase)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def save(cluster, path: str | Path, *, extra: dict[str, Any] | None = None) -> str:
    """Every rank writes its shards (DP rank 0 of each shard) into ``path.tmp-<nonce>/``;
    the driver adds the index (with the data position it counted and ``extra``) and
    renames the directory to ``path``. A previous checkpoint at ``path`` is replaced only
    then, so a crash leaves it intact."""
    cluster.steps.drain()
    path, staging, results = _staged(cluster, path, "save", "save_shard")
    try:
        files = {name: record for r in results for name, record in r["files"].items()}
        write_index(staging, results[0]["meta"], files, data_position=cluster.data_position, extra=extra)
        commit_dir(staging, path)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    log.info("saved %s (step %d, data position %d)", path, results[0]["meta"]["step"],
             cluster.data_position)
    return str(path)


def load(cluster, path: str | Path) -> dict[str, Any]:
    """Load ``path`` on every rank (resharding to this cluster's tp); returns ``{"step",
    "data_position", "extra"}`` (the cluster takes the data position from it)."""
    if not cluster.built:
        raise RuntimeError("load() before build(): build the same model first, then load its state")
    index = read_index(Path(path))  # a clear error here rather than one per rank
    # Every file whole and unchanged before any rank loads: a rank that failed half-way
    # would leave the model part old, part loaded.
    verify_files(Path(path), index["files"])
    cluster.steps.drain()
    return cluster.run("load_checkpoint", str(Path(path).resolve()), phase="load")[0]


def export_hf(cluster, path: str | Path, dtype: str | None = None) -> str:
    """Gather the model (its master weights under mixed precision) and write it as a
    Hugging Face checkpoint at ``path`` (atomically), its tensors in ``dtype`` (None: as
    the ranks hold them; see :func:`raytp.models.hf_export.export_hf`). A model built from
    a Hugging Face directory gets its bos/eos/pad ids and tokenizer files
    (:mod:`raytp.driver.export`); one raytp cannot export is refused before any rank work."""
    if dtype is not None:
        export_dtype(dtype)  # a bad name refused here, before any rank work
    if cluster.built:
        export.check_exportable(cluster.spec)
    path, staging, results = _staged(cluster, path, "export_hf", "export_hf", dtype)
    try:
        if not any(results):
            raise RuntimeError("no rank wrote the export")
        export.complete_from_source(staging, export.source_directory(cluster.spec))
        commit_dir(staging, path)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return str(path)
