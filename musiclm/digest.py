"""File checksums: the sha256 that tokenizer records, checkpoint references and corpus manifests keep.

Layer: base.
"""

from __future__ import annotations

import hashlib
from pathlib import Path


def file_digest(path: str | Path) -> tuple[int, str]:
    """``(bytes, sha256 hex)`` of a file, read once in 1 MiB blocks (hashlib lets other threads run meanwhile)."""
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
            size += len(block)
    return size, h.hexdigest()


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file's bytes."""
    return file_digest(path)[1]
