"""Writing shards so that a crash loses at most the shard in flight.

A shard ``N`` is *finished* when ``shards/shard-N.tar`` exists. Everything that
belongs to it is written first under temporary names and renamed in this
order: ``stats/shard-N.parquet`` (and ``stats/_codes/``), ``errors/shard-N.parquet``,
then the tar. So

- a finished shard always has its stats;
- stats without a tar are leftovers of a killed run and are removed on resume;
- an errors file stands on its own: the files it lists are done (they failed),
  even when the run was killed before its tar was renamed. Shard indices are
  therefore never reused across tars *or* errors files.
"""

from __future__ import annotations

import time
from collections.abc import Set as AbstractSet
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import webdataset as wds

from musiclm import atomic
from musiclm.shards.format import TokenInfo, TokenSample, file_key, shard_name
from musiclm.shards.stats import write_shard_stats

ERROR_SCHEMA = pa.schema(
    [
        ("key", pa.string()),  # segment key, or the file key when the whole file failed
        ("source", pa.string()),  # path relative to the corpus root
        ("step", pa.string()),  # "decode" | "tokenize"
        ("reason", pa.string()),
        ("time", pa.float64()),
    ]
)


def write_errors(path: Path, rows: list[dict]) -> None:
    atomic.write_parquet(pa.Table.from_pylist(rows, schema=ERROR_SCHEMA), path)


class ShardWriter:
    """Buffers samples and writes them as finished shards of ``shard_size`` clips."""

    def __init__(self, out_dir: str | Path, info: TokenInfo, shard_size: int, start_index: int):
        self.out = Path(out_dir)
        self.info = info
        self.shard_size = shard_size
        self.index = start_index
        self.samples: list[TokenSample] = []
        self.errors: list[dict] = []
        self.shards_written = 0
        self.errors_written = 0
        for sub in ("shards", "stats", "errors"):
            (self.out / sub).mkdir(parents=True, exist_ok=True)

    def add(self, sample: TokenSample) -> None:
        self.samples.append(sample)
        if len(self.samples) >= self.shard_size:
            self.flush()

    def add_error(self, key: str, source: str, step: str, reason: str) -> None:
        self.errors.append({"key": key, "source": source, "step": step, "reason": reason, "time": time.time()})

    def flush(self) -> None:
        """Write what is buffered as shard ``index`` (and/or its errors file), then advance the index."""
        if not self.samples and not self.errors:
            return
        name = shard_name(self.index)
        tar_final = self.out / "shards" / f"{name}.tar"
        tar_tmp = atomic.temp_path(tar_final)
        if self.samples:
            with wds.TarWriter(str(tar_tmp)) as sink:
                for s in self.samples:
                    sink.write(s.to_wds())
            write_shard_stats(self.out / "stats", name, self.samples, self.info)
        if self.errors:
            write_errors(self.out / "errors" / f"{name}.parquet", self.errors)
            self.errors_written += len(self.errors)
        if self.samples:
            atomic.fsync_replace(tar_tmp, tar_final)
            self.shards_written += 1
        self.samples, self.errors = [], []
        self.index += 1

    def close(self) -> None:
        self.flush()


def next_shard_index(out_dir: str | Path) -> int:
    """First index not used by a finished shard or an errors file."""
    out = Path(out_dir)
    used = [int(p.stem.split("-")[1]) for p in (out / "shards").glob("shard-*.tar")]
    used += [int(p.stem.split("-")[1]) for p in (out / "errors").glob("shard-*.parquet")]
    return max(used) + 1 if used else 0


def clean_unfinished(out_dir: str | Path) -> int:
    """Remove temporaries and stats of shards whose tar was never renamed; return how many files went."""
    out = Path(out_dir)
    finished = {p.stem for p in (out / "shards").glob("shard-*.tar")}
    removed = 0
    for pattern in ("shards/.*.tmp", "stats/.*.tmp", "stats/_codes/.*.tmp", "errors/.*.tmp"):
        for p in out.glob(pattern):
            p.unlink()
            removed += 1
    for folder in (out / "stats", out / "stats" / "_codes"):
        for p in folder.glob("shard-*.parquet"):
            if p.stem not in finished:
                p.unlink()
                removed += 1
    return removed


def _read_columns(folder: Path, columns: list[str]) -> pa.Table | None:
    """``columns`` of every shard-*.parquet in ``folder`` as one table; None when there is none."""
    files = sorted(folder.glob("shard-*.parquet"))
    return pads.dataset([str(f) for f in files], format="parquet").to_table(columns=columns) if files else None


def done_files(out_dir: str | Path) -> set[str]:
    """Sources (paths relative to the corpus root) with nothing left to do: every segment is in a
    finished shard, or the whole file failed. Call :func:`clean_unfinished` first."""
    out = Path(out_dir)
    done: set[str] = set()
    t = _read_columns(out / "stats", ["source", "segment", "segments"])
    if t is not None:
        t = t.group_by(["source", "segments"]).aggregate([("segment", "count_distinct")])
        full = pc.equal(t.column("segment_count_distinct"), pc.cast(t.column("segments"), pa.int64()))
        done.update(t.filter(full).column("source").to_pylist())
    t = _read_columns(out / "errors", ["key", "source"])
    if t is not None:
        done.update(src for key, src in zip(t.column("key").to_pylist(), t.column("source").to_pylist()) if key == file_key(src))
    return done


def done_keys(out_dir: str | Path) -> set[str]:
    """Keys already settled in ``out_dir``: clips in finished shards, and keys listed in errors files.

    Call :func:`clean_unfinished` first so that stats of unfinished shards do not count.
    """
    out = Path(out_dir)
    keys: set[str] = set()
    for folder in (out / "stats", out / "errors"):
        table = _read_columns(folder, ["key"])
        if table is not None:
            keys.update(table.column("key").to_pylist())
    return keys


def partial_keys(out_dir: str | Path, done: AbstractSet[str]) -> set[str]:
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
    keys: set[str] = set()
    for folder in (out / "stats", out / "errors"):
        for path in sorted(folder.glob("shard-*.parquet")):
            t = pq.read_table(path, columns=["key", "source"])
            open_sources = [s for s in pc.unique(t.column("source")).to_pylist() if s not in done]
            if open_sources:
                rows = t.filter(pc.is_in(t.column("source"), value_set=pa.array(open_sources, pa.string())))
                keys.update(rows.column("key").to_pylist())
    return keys
