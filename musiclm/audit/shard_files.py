"""One shard's audit files: the n-grams, CLAP sign bits and clip table computed from its clips, written, and
memory-mapped back (the layout is in :mod:`musiclm.audit.index`).

Layer: audit.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from musiclm import atomic
from musiclm.audit.ngrams import ngram_hashes, winnow
from musiclm.errors import UserError
from musiclm.shards.format import TokenSample
from musiclm.shards.tar import decode_sample, iter_tar_samples

SHARD_FILES = ("ngrams.npy", "clap.npy", "clips.parquet")

CLIP_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("source", pa.string()),  # path relative to the corpus root
        ("segment", pa.int32()),
        ("start", pa.float64()),  # seconds into the source file
        ("duration", pa.float64()),
        ("frames", pa.int32()),  # semantic frames
        ("clap_row", pa.int64()),  # first row of the clip's windows in clap.npy
        ("clap_windows", pa.int32()),
    ]
)


@dataclass(frozen=True)
class IndexParams:
    """What the index files hold; an index built with other values is rebuilt."""

    n: int = 3  # run codes per n-gram
    winnow: int = 4  # keep the smallest hash of every `winnow` consecutive n-grams
    clap_bits: int = 256  # SimHash bits per CLAP window
    seed: int = 0  # of the CLAP projection


@dataclass
class ShardArrays:
    """The index of one shard, in memory (see the module docstring for shapes)."""

    ngrams: np.ndarray  # [2, M] uint64: sorted hashes; clip << 32 | frame
    clap_bits: np.ndarray
    clips: pa.Table
    count: int  # n-grams before winnowing
    frames: int  # semantic frames of all clips


def clap_projection(dim: int, params: IndexParams) -> np.ndarray:
    """A random Gaussian projection [B, D] float32 (made once per index and stored with it)."""
    return np.random.default_rng(params.seed).standard_normal((params.clap_bits, dim)).astype(np.float32)


def clap_signs(emb: np.ndarray, projection: np.ndarray) -> np.ndarray:
    """SimHash codes of embeddings [W, D] → [W, B/8] uint8: which side of each random hyperplane."""
    return np.packbits(np.asarray(emb, np.float32) @ projection.T > 0, axis=1)


def shard_arrays(samples: Iterable[TokenSample], params: IndexParams, projection: np.ndarray) -> ShardArrays:
    """Index one shard's clips (in tar order): winnowed n-grams sorted by hash, CLAP sign bits, the clip table."""
    hashes, postings, bits, rows = [], [], [], []
    count = frames = clap_row = 0
    for i, s in enumerate(samples):
        h, f = ngram_hashes(s.semantic, params.n)
        count += len(h)
        frames += len(s.semantic)
        h, f = winnow(h, f, params.winnow)
        hashes.append(h)
        postings.append((np.uint64(i) << np.uint64(32)) | f.astype(np.uint64))
        bits.append(np.asarray(s.clap_emb, np.float32))
        meta = s.meta
        rows.append(
            {
                "key": s.key,
                "source": meta.get("source"),
                "segment": meta.get("segment"),
                "start": float(meta.get("start") or 0.0),
                "duration": float(meta.get("duration") or 0.0),
                "frames": len(s.semantic),
                "clap_row": clap_row,
                "clap_windows": len(s.clap_emb),
            }
        )
        clap_row += len(s.clap_emb)
    h = np.concatenate(hashes) if hashes else np.zeros(0, np.uint64)
    p = np.concatenate(postings) if postings else np.zeros(0, np.uint64)
    order = np.argsort(h, kind="stable")
    b = clap_signs(np.concatenate(bits), projection) if bits else np.zeros((0, params.clap_bits // 8), np.uint8)  # one product for the shard
    return ShardArrays(np.stack([h[order], p[order]]), b, pa.Table.from_pylist(rows, schema=CLIP_SCHEMA), count, frames)


def save_npy(path: Path, array: np.ndarray) -> None:
    """Write ``array`` as ``path`` (.npy), whole or not at all."""
    tmp = atomic.temp_path(path)
    with open(tmp, "wb") as f:
        np.save(f, np.ascontiguousarray(array), allow_pickle=False)
    atomic.fsync_replace(tmp, path)


def write_shard(folder: Path, name: str, arrays: ShardArrays) -> dict[str, Any]:
    """Write one shard's index files into ``folder``; returns its entry for index.json."""
    save_npy(folder / f"{name}.ngrams.npy", arrays.ngrams)
    save_npy(folder / f"{name}.clap.npy", arrays.clap_bits)
    atomic.write_parquet(arrays.clips, folder / f"{name}.clips.parquet")
    return {"clips": arrays.clips.num_rows, "entries": arrays.ngrams.shape[1], "ngrams": arrays.count, "frames": arrays.frames, "clap_windows": len(arrays.clap_bits)}


def read_shard_samples(path: Path, want: set[int] | None = None) -> Iterator[tuple[int, TokenSample]]:
    """Clips of one shard tar in order, ``(position, sample)``; only the positions in ``want`` when given
    (the reading stops after the last of them)."""
    last = max(want) if want else None
    with open(path, "rb") as f:
        try:
            for pos, key, members in iter_tar_samples(f, want=None if want is None else want.__contains__, where=str(path)):
                if members is not None:
                    yield pos, decode_sample(key, members)
                if last is not None and pos >= last:
                    return
        except (ValueError, KeyError) as e:
            raise UserError(f"cannot read shard {path}: {e}; re-run musiclm tokenize to rewrite it") from None


def tar_stamp(path: Path) -> dict[str, int]:
    """Size and mtime of a shard tar: what an index entry was built from (it is rebuilt when they change)."""
    st = path.stat()
    return {"tar_bytes": st.st_size, "tar_mtime_ns": st.st_mtime_ns}


class ShardIndex:
    """One shard's index files, memory-mapped on first use."""

    def __init__(self, folder: Path, name: str, entry: dict[str, Any], tar: Path | None):
        self.folder, self.name, self.entry, self.tar = folder, name, entry, tar
        self.clips = int(entry["clips"])
        self._maps: dict[str, np.ndarray] = {}
        self._table: dict[str, np.ndarray] | None = None

    def _map(self, kind: str) -> np.ndarray:
        if kind not in self._maps:
            self._maps[kind] = np.load(self.folder / f"{self.name}.{kind}.npy", mmap_mode="r", allow_pickle=False)
        return self._maps[kind]

    @property
    def ngrams(self) -> np.ndarray:
        """[2, M] uint64: sorted hashes; clip << 32 | frame."""
        return self._map("ngrams")

    @property
    def clap_bits(self) -> np.ndarray:
        return self._map("clap")

    @property
    def table(self) -> dict[str, np.ndarray]:
        """The clip table as numpy columns (read on first use)."""
        if self._table is None:
            t = pq.read_table(self.folder / f"{self.name}.clips.parquet")
            self._table = {c: t.column(c).to_numpy(zero_copy_only=False) for c in t.column_names}
        return self._table
