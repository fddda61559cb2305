"""Writing shards so that a crash loses at most the shard in flight, each with its checksum record.

The files of shard ``N`` and its record are laid out in :mod:`musiclm.shards.records`. Write order
(:meth:`ShardWriter.flush`): the tar under a temporary name → code counts → clip stats → errors → the
tar renamed → the record (a repair, rewriting an index whose record says what is to redo, records the
tar before renaming it: a tar on disk that its record does not name is then always a damaged one on
its way out). So

- a finished shard (its tar) always has its stats;
- stats without a tar are leftovers of a killed run and are removed on resume (:func:`clean_unfinished`);
- an errors file stands on its own: the files it lists are done (they failed), even when the run was
  killed before its tar was renamed. Shard indices are therefore never reused across tars, errors files
  or records, except by a repair (:mod:`musiclm.shards.repair`), which rewrites the index it repairs;
- a file without a record was written by a run killed just before its record was (or by a musiclm
  from before records): the next run reads it whole and records it when it reads.

Layer: shards (imports the base layer and the shards modules below it: format, records, stats).
"""

from __future__ import annotations

import time
from pathlib import Path

import pyarrow as pa
import webdataset as wds

from musiclm import atomic
from musiclm.integrity import DamagedFile, FileRecord
from musiclm.shards.format import TokenInfo, TokenSample, shard_name
from musiclm.shards.records import RECORDS_DIR, ShardRecord, file_stat, membership, shard_files
from musiclm.shards.stats import write_shard_stats

ERROR_SCHEMA = pa.schema(
    [
        ("key", pa.string()),  # segment key, or the file key when the whole file failed
        ("source", pa.string()),  # path relative to the corpus root
        ("step", pa.string()),  # "decode" | "tokenize" | "repair"
        ("reason", pa.string()),
        ("time", pa.float64()),
    ]
)


def write_errors(path: Path, rows: list[dict]) -> None:
    atomic.write_parquet(pa.Table.from_pylist(rows, schema=ERROR_SCHEMA), path)


class ShardWriter:
    """Buffers samples and writes them as finished shards of ``shard_size`` clips, each with its record."""

    def __init__(self, out_dir: str | Path, info: TokenInfo, shard_size: int, start_index: int):
        self.out = Path(out_dir)
        self.info = info
        self.shard_size = shard_size
        self.index = start_index
        self.samples: list[TokenSample] = []
        self.errors: list[dict] = []
        self.batch_of: dict[str, int] = {}  # clip key -> planned batch, kept in the record
        self.shards_written = 0
        self.errors_written = 0
        for sub in ("shards", "stats", "errors", RECORDS_DIR):
            (self.out / sub).mkdir(parents=True, exist_ok=True)

    def add(self, sample: TokenSample, batch: int = -1) -> None:
        self.samples.append(sample)
        self.batch_of[sample.key] = batch
        if len(self.samples) >= self.shard_size:
            self.flush()

    def add_error(self, key: str, source: str, step: str, reason: str) -> None:
        self.errors.append({"key": key, "source": source, "step": step, "reason": reason, "time": time.time()})

    def flush(self) -> None:
        """Write what is buffered as shard ``index`` (and/or its errors file) and its record, then advance the index."""
        if not self.samples and not self.errors:
            return
        name = shard_name(self.index)
        rels = shard_files(name)
        try:  # a repair rewrites an index whose record keeps its errors file and what is still to redo
            rec = ShardRecord.read(self.out, name) or ShardRecord(name)
        except DamagedFile:
            rec = ShardRecord(name)  # the next run records the index's other files after reading them whole
        repairing = bool(rec.redo)
        tar_final = self.out / rels["tar"]
        tar_tmp = atomic.temp_path(tar_final)
        if self.samples:
            with wds.TarWriter(str(tar_tmp)) as sink:
                for s in self.samples:
                    sink.write(s.to_wds())
            write_shard_stats(self.out / "stats", name, self.samples, self.info)
            for kind in ("stats", "codes"):
                rec.note(self.out, rels[kind])
            rec.files[rels["tar"]] = FileRecord.of(tar_tmp)
            rec.clips = membership(self.samples, self.batch_of)
            rec.drop_settled({s.key for s in self.samples})
        if self.errors:
            write_errors(self.out / rels["errors"], self.errors)
            rec.note(self.out, rels["errors"])
            rec.errors = [[r["key"], r["source"]] for r in self.errors]
            self.errors_written += len(self.errors)
        if self.samples:
            if repairing:
                rec.write(self.out)  # before the rename (see the module docstring)
            atomic.fsync_replace(tar_tmp, tar_final)
            rec.stat[rels["tar"]] = file_stat(tar_final)
            self.shards_written += 1
        rec.write(self.out)
        self.samples, self.errors, self.batch_of = [], [], {}
        self.index += 1

    def close(self) -> None:
        self.flush()


def next_shard_index(out_dir: str | Path) -> int:
    """First index not used by a finished shard, an errors file or a record."""
    out = Path(out_dir)
    used = [int(p.stem.split("-")[1]) for p in (out / "shards").glob("shard-*.tar")]
    used += [int(p.stem.split("-")[1]) for p in (out / "errors").glob("shard-*.parquet")]
    used += [int(p.stem.split("-")[1]) for p in (out / RECORDS_DIR).glob("shard-*.json")]
    return max(used) + 1 if used else 0


def clean_unfinished(out_dir: str | Path) -> int:
    """Remove temporaries and stats of shards whose tar was never renamed; return how many files went."""
    out = Path(out_dir)
    finished = {p.stem for p in (out / "shards").glob("shard-*.tar")}
    removed = 0
    for pattern in ("shards/.*.tmp", "stats/.*.tmp", "stats/_codes/.*.tmp", "errors/.*.tmp", f"{RECORDS_DIR}/.*.tmp"):
        for p in out.glob(pattern):
            p.unlink()
            removed += 1
    for folder in (out / "stats", out / "stats" / "_codes"):
        for p in folder.glob("shard-*.parquet"):
            if p.stem not in finished:
                p.unlink()
                removed += 1
    return removed
