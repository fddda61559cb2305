"""Checked reads of a tokenized folder's Parquet files, and what resume learns from them.

Every file is checked against the record its shard keeps (:mod:`musiclm.shards.records`) before it is
read (:func:`check_read`), and a file pyarrow cannot read is a one-line
:class:`~musiclm.integrity.DamagedFile` saying how to repair it (:func:`read_parquet`), never a pyarrow
traceback. Resume asks what is settled already: :func:`done_files`, :func:`done_keys`,
:func:`partial_keys`. (Shard tars are read by :mod:`musiclm.shards.tar`.)

Layer: shards (imports the base layer, :mod:`musiclm.shards.format` and :mod:`musiclm.shards.records`).
"""

from __future__ import annotations

from collections.abc import Set as AbstractSet
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from musiclm.integrity import DamagedFile, FileRecord, require
from musiclm.shards.format import file_key
from musiclm.shards.records import RECORDS_DIR, recorded_files, repair_advice

ARROW_ERRORS = (pa.ArrowException, OSError, ValueError)


def check_read(path: str | Path, out: str | Path, records: dict[str, FileRecord] | None, full: bool = False) -> Path:
    """``path`` (a file of the tokenized folder ``out``) once it passes a quick check against its record
    in ``records`` (a full one with ``full``); else :class:`DamagedFile`. In a folder that keeps records,
    a file without one is refused too (its record was lost); in one from before records, only its end
    marker is checked."""
    path, out = Path(path), Path(out)
    record = None if records is None else records.get(path.relative_to(out).as_posix())
    if record is None and records is not None and path.is_file() and (out / RECORDS_DIR).is_dir():
        raise DamagedFile(path, f"it has no record in {RECORDS_DIR}/", repair_advice(out))
    return require(path, record, repair_advice(out), full=full)


def read_parquet(path: str | Path, out: str | Path, **kwargs) -> pa.Table:
    """``pq.read_table(path, **kwargs)``; a file pyarrow cannot read is a :class:`DamagedFile`, not a traceback."""
    try:
        return pq.read_table(path, **kwargs)
    except ARROW_ERRORS as e:
        raise DamagedFile(path, f"unreadable Parquet: {str(e).splitlines()[0][:200]}", repair_advice(out)) from None


def _read_columns(out: Path, folder: Path, columns: list[str], records: dict[str, FileRecord] | None) -> pa.Table | None:
    """``columns`` of every shard-*.parquet in ``folder`` as one table, each file checked first; None when there is none."""
    files = [check_read(f, out, records) for f in sorted(folder.glob("shard-*.parquet"))]
    if not files:
        return None
    try:
        return pads.dataset([str(f) for f in files], format="parquet").to_table(columns=columns)
    except ARROW_ERRORS:
        for f in files:  # name the file that does not read
            read_parquet(f, out, columns=columns)
        raise


def _records_for(out: Path, records: dict[str, FileRecord] | None) -> dict[str, FileRecord]:
    return recorded_files(out, ("stats", "errors")) if records is None else records


def done_files(out_dir: str | Path, records: dict[str, FileRecord] | None = None) -> set[str]:
    """Sources (paths relative to the corpus root) with nothing left to do: every segment is in a
    finished shard, or the whole file failed. Call :func:`clean_unfinished` first. Every file read is
    checked against ``records`` (:func:`recorded_files`; read here when not given)."""
    out = Path(out_dir)
    records = _records_for(out, records)
    done: set[str] = set()
    t = _read_columns(out, out / "stats", ["source", "segment", "segments"], records)
    if t is not None:
        t = t.group_by(["source", "segments"]).aggregate([("segment", "count_distinct")])
        full = pc.equal(t.column("segment_count_distinct"), pc.cast(t.column("segments"), pa.int64()))
        done.update(t.filter(full).column("source").to_pylist())
    t = _read_columns(out, out / "errors", ["key", "source"], records)
    if t is not None:
        done.update(src for key, src in zip(t.column("key").to_pylist(), t.column("source").to_pylist()) if key == file_key(src))
    return done


def done_keys(out_dir: str | Path, records: dict[str, FileRecord] | None = None) -> set[str]:
    """Keys already settled in ``out_dir``: clips in finished shards, and keys listed in errors files.

    Call :func:`clean_unfinished` first so that stats of unfinished shards do not count.
    """
    out = Path(out_dir)
    records = _records_for(out, records)
    keys: set[str] = set()
    for folder in (out / "stats", out / "errors"):
        table = _read_columns(out, folder, ["key"], records)
        if table is not None:
            keys.update(table.column("key").to_pylist())
    return keys


def partial_keys(out_dir: str | Path, done: AbstractSet[str], records: dict[str, FileRecord] | None = None) -> set[str]:
    """The keys of :func:`done_keys` whose source is not in ``done``: the settled segments of files
    that are only partly finished.

    ``done`` is what :func:`done_files` returned, all of it (a finished file
    left out of it, say one no longer in the corpus, would have its keys
    returned too). Resume skips those files whole, so only these keys need to
    reach the decode stage: a handful instead of every key of the corpus.
    Reads the key and source columns one file at a time; call
    :func:`clean_unfinished` first.
    """
    out = Path(out_dir)
    records = _records_for(out, records)
    keys: set[str] = set()
    for folder in (out / "stats", out / "errors"):
        for path in sorted(folder.glob("shard-*.parquet")):
            t = read_parquet(check_read(path, out, records), out, columns=["key", "source"])
            open_sources = [s for s in pc.unique(t.column("source")).to_pylist() if s not in done]
            if open_sources:
                rows = t.filter(pc.is_in(t.column("source"), value_set=pa.array(open_sources, pa.string())))
                keys.update(rows.column("key").to_pylist())
    return keys
