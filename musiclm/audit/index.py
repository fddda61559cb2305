"""The audit index of a tokenized corpus: one set of files per shard under ``DIR/audit/``, built once.

For each finished shard ``shards/shard-N.tar`` the index holds::

    audit/shard-N.ngrams.npy    uint64 [2, M]   row 0: the winnowed n-gram hashes of the shard's semantic
                                                tokens, sorted; row 1: for each, the clip (its position in
                                                the tar) << 32 | the frame in that clip where it starts
    audit/shard-N.clap.npy      uint8  [W, B/8] sign bits of each CLAP window embedding after a fixed random
                                                projection (SimHash: Hamming distance estimates the angle)
    audit/shard-N.clips.parquet one row per clip in tar order: key, source, segment, start, duration,
                                frames, clap_row (first row of its windows in clap.npy), clap_windows
    audit/clap_projection.npy   float32 [B, D]  the projection, shared by all shards
    audit/index.json            format, parameters, tokenizer fingerprint, what was indexed from each shard
                                (size and mtime of its tar), and the calibrated thresholds

Arrays are memory-mapped when queried, so a query touches only the pages it
needs (two open files per shard: the soft limit of open files is raised
towards the hard one when a large index needs it). Adding a shard to the corpus (a resumed or extended tokenize) adds one
set of files; the others are reused as long as their tar is unchanged. A shard
whose tar changed, or an index of other parameters or another tokenizer, is
rebuilt. Every file is written under a temporary name and renamed; index.json
is renamed last, so a run killed while indexing leaves a usable index.

One shard's files are made and read by :mod:`musiclm.audit.shard_files`. Reading needs numpy, pyarrow
and faiss only: no backbone, no Ray. Shard tars are read with :mod:`musiclm.shards.tar`, the one
shard-tar reader.

Layer: audit (imports the base layer and shards).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from musiclm import atomic
from musiclm.audit.shard_files import (
    SHARD_FILES,
    IndexParams,
    ShardIndex,
    clap_projection,
    clap_signs,
    read_shard_samples,
    save_npy,
    shard_arrays,
    tar_stamp,
    write_shard,
)
from musiclm.errors import UserError
from musiclm.integrity import quick_check
from musiclm.shards.format import TokenInfo, TokenSample, list_shards

INDEX_DIR = "audit"
INDEX_FILE = "index.json"
INDEX_FORMAT = 2  # 2: one n-gram file per shard
PROJECTION_FILE = "clap_projection.npy"
class AuditIndex:
    """The index of a tokenized corpus: its shards in order, each clip known by a global id
    (its shard's first id + its position in the tar) and each CLAP window by a global row."""

    def __init__(self, data_dir: Path, info: TokenInfo, params: IndexParams, record: dict[str, Any], shards: list[ShardIndex], projection: np.ndarray):
        self.data_dir, self.info, self.params, self.record = data_dir, info, params, record
        self.folder = data_dir / INDEX_DIR
        self.shards = shards
        self.projection = projection
        self.clip_offsets = np.cumsum([0] + [s.clips for s in shards])  # [S + 1]
        self.row_offsets = np.cumsum([0] + [int(s.entry["clap_windows"]) for s in shards])  # [S + 1]
        self.built: list[str] = []  # shards indexed by the call that opened it
        self.reused: list[str] = []
        self.removed: list[str] = []

    # ---- facts -------------------------------------------------------------------------------------------------
    @property
    def clips(self) -> int:
        return int(self.clip_offsets[-1])

    @property
    def entries(self) -> int:
        return sum(int(s.entry["entries"]) for s in self.shards)

    @property
    def density(self) -> float:
        """Indexed n-grams per n-gram (winnowing keeps about 2 / (w + 1))."""
        total = sum(int(s.entry["ngrams"]) for s in self.shards)
        return self.entries / total if total else 0.0

    @property
    def rate(self) -> float:
        return float(self.info.semantic.frame_rate)

    @property
    def calibration(self) -> dict[str, Any] | None:
        return self.record.get("calibration")

    def save_calibration(self, calibration: dict[str, Any]) -> None:
        self.record["calibration"] = calibration
        atomic.write_text(self.folder / INDEX_FILE, json.dumps(self.record, indent=1, sort_keys=True))

    def bytes_on_disk(self) -> int:
        return sum(p.stat().st_size for p in self.folder.iterdir() if p.is_file() and not p.name.startswith("."))

    def locate(self, gid: np.ndarray | int) -> tuple[np.ndarray, np.ndarray]:
        """Global clip ids → (shard number, position in the shard)."""
        gid = np.asarray(gid, np.int64)
        s = np.searchsorted(self.clip_offsets, gid, side="right") - 1
        return s, gid - self.clip_offsets[s]

    def clip(self, gid: int) -> dict[str, Any]:
        """One clip's row of the clip table, plus ``gid`` and ``shard``."""
        s, pos = (int(x) for x in self.locate(gid))
        t = self.shards[s].table
        return {c: (v[pos].item() if hasattr(v[pos], "item") else v[pos]) for c, v in t.items()} | {"gid": int(gid), "shard": s}

    def clips_of_sources(self, sources: set[str]) -> np.ndarray:
        """Global ids of every clip of these source files (reads every clip table)."""
        out = [np.flatnonzero(np.isin(sh.table["source"], list(sources))) + self.clip_offsets[s] for s, sh in enumerate(self.shards)]
        return np.concatenate(out) if out else np.zeros(0, np.int64)

    # ---- lookups -----------------------------------------------------------------------------------------------
    def lookup(self, hashes: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Every indexed occurrence of the query n-grams ``hashes`` [G]: (global clip id, frame in that clip,
        index into ``hashes``), each [matches] int64.

        An n-gram that a shard holds more often than ``max(64, 4 x its clips)`` times is left out in that
        shard: it says nothing about which clip a query came from (a stop word), and looking it up would cost
        more than every informative n-gram together."""
        uniq, inv = np.unique(hashes, return_inverse=True)  # the phases of a query share most n-grams
        gids, frames, which = [], [], []
        for s, sh in enumerate(self.shards):
            if sh.clips == 0 or int(sh.entry["entries"]) == 0:
                continue
            h, post = sh.ngrams
            lo = np.searchsorted(h, uniq, side="left")
            cnt = np.searchsorted(h, uniq, side="right") - lo
            cnt[cnt > max(64, 4 * sh.clips)] = 0
            total = int(cnt.sum())
            if total == 0:
                continue
            starts = np.repeat(lo - np.cumsum(cnt) + cnt, cnt) + np.arange(total)  # every posting of every hit, ascending
            hit = np.asarray(post[starts])
            gids.append((hit >> np.uint64(32)).astype(np.int64) + self.clip_offsets[s])
            frames.append((hit & np.uint64(0xFFFFFFFF)).astype(np.int64))
            which.append(np.repeat(np.arange(len(uniq)), cnt))
        if not gids:
            z = np.zeros(0, np.int64)
            return z, z, z
        # each posting of a unique hash goes to every query n-gram that has it
        u = np.concatenate(which)
        occ = np.bincount(inv, minlength=len(uniq))
        order = np.argsort(inv, kind="stable")
        rep = occ[u]
        total = int(rep.sum())
        qidx = order[np.repeat(np.cumsum(occ)[u] - rep, rep) + np.arange(total) - np.repeat(np.cumsum(rep) - rep, rep)]
        return np.repeat(np.concatenate(gids), rep), np.repeat(np.concatenate(frames), rep), qidx

    def clap_nearest(self, emb: np.ndarray, k: int) -> np.ndarray:
        """Global CLAP window rows nearest to the query windows ``emb`` [Q, D] by SimHash Hamming distance:
        the ``k`` nearest per query window, over all shards → [<= Q * k] int64 (unique)."""
        import faiss

        q = clap_signs(emb, self.projection)
        best_d, best_r = [], []
        threads = faiss.omp_get_max_threads()
        faiss.omp_set_num_threads(1)  # a shard's scan takes microseconds; waking threads costs a hundred times more
        try:
            for s, sh in enumerate(self.shards):
                n = int(sh.entry["clap_windows"])
                if n == 0:
                    continue
                d, i = faiss.knn_hamming(q, np.ascontiguousarray(sh.clap_bits), min(k, n))
                best_d.append(d)
                best_r.append(i + self.row_offsets[s])
        finally:
            faiss.omp_set_num_threads(threads)
        if not best_d:
            return np.zeros(0, np.int64)
        d, r = np.concatenate(best_d, axis=1), np.concatenate(best_r, axis=1)  # [Q, S * k]
        top = np.argsort(d, axis=1, kind="stable")[:, :k]
        return np.unique(np.take_along_axis(r, top, axis=1))

    def clips_of_rows(self, rows: np.ndarray) -> np.ndarray:
        """Global CLAP window rows → global clip ids."""
        rows = np.asarray(rows, np.int64)
        s = np.searchsorted(self.row_offsets, rows, side="right") - 1
        out = np.empty(len(rows), np.int64)
        for i, (si, r) in enumerate(zip(s, rows)):
            first = self.shards[si].table["clap_row"]
            out[i] = self.clip_offsets[si] + np.searchsorted(first, r - self.row_offsets[si], side="right") - 1
        return out

    def read_clips(self, gids: Iterable[int]) -> dict[int, TokenSample]:
        """The stored tokens of these clips, read from their shard tars (one pass per shard)."""
        by_shard: dict[int, set[int]] = {}
        for g in gids:
            s, pos = (int(x) for x in self.locate(int(g)))
            by_shard.setdefault(s, set()).add(pos)
        out: dict[int, TokenSample] = {}
        for s, want in sorted(by_shard.items()):
            sh = self.shards[s]
            if sh.tar is None:
                raise UserError(f"the shard {sh.name} of the audit index has no tar in {self.data_dir / 'shards'}: re-run musiclm audit")
            for pos, sample in read_shard_samples(sh.tar, want):
                out[int(self.clip_offsets[s]) + pos] = sample
        return out


# ---- building and opening ----------------------------------------------------------------------------------------


@contextmanager
def index_lock(data_dir: Path) -> Iterator[None]:
    """Held while the index is built, extended or calibrated; a second audit of the same corpus waits."""
    from filelock import FileLock

    folder = data_dir / INDEX_DIR
    try:
        folder.mkdir(exist_ok=True)
        lock = FileLock(str(folder / ".lock"))
        lock.acquire()
    except OSError as e:
        raise UserError(f"cannot write the audit index to {folder} ({e.strerror or e}): the tokenized folder must be writable") from None
    try:
        yield
    finally:
        lock.release()


def check_corpus(data_dir: str | Path, option: str = "--data") -> tuple[Path, TokenInfo, list[Path]]:
    """A tokenized corpus folder, its TokenInfo and its finished shards; a one-line UserError naming
    ``option`` otherwise."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise UserError(f"{option} {data_dir} does not exist: pass the --out folder of musiclm tokenize")
    if not (data_dir / "tokenizer" / "tokenizer.json").is_file():
        raise UserError(f"{option} {data_dir} is not a tokenized corpus (no tokenizer/tokenizer.json): pass the --out folder of musiclm tokenize")
    info = TokenInfo.load(data_dir)
    shards = list_shards(data_dir)
    if not shards:
        raise UserError(f"{option} {data_dir} has no finished shards (expected shards/shard-000000.tar): run musiclm tokenize first")
    return data_dir, info, shards


def _fresh_record(info: TokenInfo, params: IndexParams) -> dict[str, Any]:
    return {"format": INDEX_FORMAT, "params": asdict(params), "tokenizer": info.fingerprint, "shards": {}}


def _remove_shard_files(folder: Path, name: str) -> None:
    for suffix in SHARD_FILES:
        (folder / f"{name}.{suffix}").unlink(missing_ok=True)


def open_index(data_dir: str | Path, params: IndexParams | None = None, progress=None) -> AuditIndex:
    """The index of ``data_dir``, built or brought up to date first (call it under :func:`index_lock`).

    New shards are indexed, shards whose tar changed or whose index files are not whole (a cheap check: npy
    header against size, Parquet markers) are re-indexed, index files of shards that are gone are
    removed; everything else is reused as it is. The calibration is dropped when anything changed.
    ``progress(name, done, total)`` is told about each shard indexed."""
    data_dir, info, tars = check_corpus(data_dir)
    params = params or IndexParams()
    folder = data_dir / INDEX_DIR
    folder.mkdir(exist_ok=True)
    record = _read_record(folder)
    if record is None or record.get("format") != INDEX_FORMAT or record.get("params") != asdict(params) or record.get("tokenizer") != info.fingerprint:
        for name in (record or {}).get("shards", {}):
            _remove_shard_files(folder, name)
        record = _fresh_record(info, params)
    proj_path = folder / PROJECTION_FILE
    if proj_path.is_file() and not record["shards"]:
        proj_path.unlink()
    if quick_check(proj_path, None) is not None:  # missing, or cut short: it is made again from its seed
        save_npy(proj_path, clap_projection(info.clap_embed_dim, params))
    projection = np.load(proj_path, allow_pickle=False)

    by_name = {t.stem: t for t in tars}
    built, reused, removed = [], [], []
    for name in sorted(set(record["shards"]) - set(by_name)):
        _remove_shard_files(folder, name)
        del record["shards"][name]
        removed.append(name)
    todo = []
    for name, tar in by_name.items():
        entry = record["shards"].get(name)
        if entry is not None and {k: entry.get(k) for k in ("tar_bytes", "tar_mtime_ns")} == tar_stamp(tar) and all(quick_check(folder / f"{name}.{s}", None) is None for s in SHARD_FILES):
            reused.append(name)
        else:
            todo.append(name)
    for i, name in enumerate(todo):
        tar = by_name[name]
        stamp = tar_stamp(tar)
        arrays = shard_arrays((s for _, s in read_shard_samples(tar)), params, projection)
        record["shards"][name] = {**write_shard(folder, name, arrays), **stamp}
        record.pop("calibration", None)
        built.append(name)
        if progress is not None:
            progress(name, i + 1, len(todo))
        if (i + 1) % 64 == 0:  # a run killed while indexing a large corpus keeps what it did
            atomic.write_text(folder / INDEX_FILE, json.dumps(record, indent=1, sort_keys=True))
    if built or removed:
        record.pop("calibration", None)
    if built or removed or not (folder / INDEX_FILE).is_file():
        atomic.write_text(folder / INDEX_FILE, json.dumps(record, indent=1, sort_keys=True))
    index = load_index(data_dir, info, record, projection, by_name)
    index.built, index.reused, index.removed = built, reused, removed
    return index


def expected_files(data_dir: str | Path) -> dict[str, tuple[None, str]]:
    """For ``musiclm verify DIR``: the files of ``DIR/audit`` that its index.json names, relative to ``DIR``
    (no checksums: the index is derived from the shards, and deleting it makes the next audit build it again)."""
    folder = Path(data_dir) / INDEX_DIR
    record = _read_record(folder)
    if record is None:
        return {}
    advice = f"delete {folder}: the next musiclm audit builds it again from the shards"
    names = [INDEX_FILE, PROJECTION_FILE] + [f"{name}.{s}" for name in record.get("shards", {}) for s in SHARD_FILES]
    return {f"{INDEX_DIR}/{n}": (None, advice) for n in names}


def _read_record(folder: Path) -> dict[str, Any] | None:
    try:
        return json.loads((folder / INDEX_FILE).read_text())
    except (OSError, ValueError):
        return None


def _allow_open_files(n: int) -> None:
    """Raise the soft limit of open files towards the hard one when ``n`` more are needed (each memory map
    holds its file open)."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = n + 1024
    if soft != resource.RLIM_INFINITY and soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want if hard == resource.RLIM_INFINITY else min(want, hard), hard))


def load_index(data_dir: Path, info: TokenInfo, record: dict[str, Any], projection: np.ndarray, tars: dict[str, Path] | None = None) -> AuditIndex:
    """An AuditIndex over the shards ``record`` lists, in name order (no file is built or checked)."""
    _allow_open_files(2 * len(record["shards"]))
    folder = data_dir / INDEX_DIR
    tars = tars if tars is not None else {t.stem: t for t in list_shards(data_dir)}
    shards = [ShardIndex(folder, name, record["shards"][name], tars.get(name)) for name in sorted(record["shards"])]
    return AuditIndex(data_dir, info, IndexParams(**record["params"]), record, shards, projection)
