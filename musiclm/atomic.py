"""Files and folders written so that a reader, or a run killed at any moment, never sees half of one.

Everything is written under a temporary name beside its destination
(:func:`temp_path`: ``.NAME.tmp``; the leading dot keeps it out of the shard
globs and out of Parquet dataset reads), flushed to disk, and renamed into
place. A rename within one folder is atomic, so the destination is either the
old file or the whole new one.

Layer: base.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any


def temp_path(path: Path) -> Path:
    """Where ``path`` is written before it is renamed into place."""
    return path.with_name(f".{path.name}.tmp")


def fsync(path: Path) -> None:
    """Flush a written file to disk."""
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def fsync_replace(tmp: Path, path: Path) -> None:
    """Flush the finished file ``tmp`` to disk and rename it to ``path``."""
    fsync(tmp)
    os.replace(tmp, path)


def write_text(path: Path, text: str) -> None:
    tmp = temp_path(path)
    tmp.write_text(text)
    fsync_replace(tmp, path)


def write_parquet(table: Any, path: Path) -> None:
    """A pyarrow table as the Parquet file ``path``."""
    import pyarrow.parquet as pq

    tmp = temp_path(path)
    pq.write_table(table, tmp)
    fsync_replace(tmp, path)


def fresh_staging(path: Path) -> Path:
    """An empty :func:`temp_path` folder in which to build the folder ``path`` (leftovers removed)."""
    staging = temp_path(path)
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    return staging


def replace_folder(staging: Path, path: Path) -> None:
    """Put the finished folder ``staging`` at ``path``, replacing whatever is there."""
    shutil.rmtree(path, ignore_errors=True)
    os.replace(staging, path)


def copy_folder(src: Path, path: Path) -> None:
    """A copy of the folder ``src`` at ``path``, replacing whatever is there."""
    staging = temp_path(path)
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(src, staging)
    replace_folder(staging, path)
