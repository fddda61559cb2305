"""Writing shards so that a crash loses at most the shard in flight; their checksum records; finding
damaged ones and preparing their repair.

The files of shard ``N`` (paths relative to the tokenized folder ``DIR``)::

    shards/shard-N.tar              the clips (WebDataset)
    stats/shard-N.parquet           one row per clip
    stats/_codes/shard-N.parquet    per-code counts
    errors/shard-N.parquet          files that failed while shard N was filled
    checksums/shard-N.json          the record of all of the above

Write order (:meth:`ShardWriter.flush`): the tar under a temporary name → code counts → clip stats →
errors → the tar renamed → the record (a repair, rewriting an index whose record says what is to redo,
records the tar before renaming it: a tar on disk that its record does not name is then always a
damaged one on its way out). So

- a finished shard (its tar) always has its stats;
- stats without a tar are leftovers of a killed run and are removed on resume (:func:`clean_unfinished`);
- an errors file stands on its own: the files it lists are done (they failed), even when the run was
  killed before its tar was renamed. Shard indices are therefore never reused across tars, errors files
  or records, except by a repair, which rewrites the index it repairs;
- a file without a record was written by a run killed just before its record was (or by a musiclm
  from before records): the next run reads it whole and records it when it reads.

**The record** ``checksums/shard-N.json`` (:func:`~musiclm.integrity.write_records`, names relative to
``DIR``; records have a folder of their own so that Parquet dataset reads of ``stats/`` and ``errors/``
never see them) holds, besides ``files`` (bytes and sha256 of each file of the shard that exists):

- ``stat``: ``{path: [mtime_ns, ctime_ns]}`` when the file was recorded or last hashed whole;
- ``clips``: ``[[source, planned batch or -1, [keys in tar order]], ...]``, the tar's clips by source file;
- ``errors``: ``[[key, source], ...]``, the rows of the errors file;
- ``redo``: null, or what a repair has still to redo: ``{"clips": [...], "errors": [...], "unknown": bool,
  "problems": {path: what was wrong}}`` (``unknown``: a damaged shard whose clips could not be read).

So which clips a shard held is known from its record even when every other file of it is lost.

**Checking and repair** (:func:`check_shards`, at the start of every ``musiclm tokenize``). Every record
is read once; every file it names gets a quick check (size and end marker), and a full sha256 when its
mtime or ctime moved since it was recorded: a file changed in place by anything is hashed, untouched
files are not (bit rot that leaves a file's times alone is for ``musiclm verify``). A file without a
record gets a structural read (every member parsed) and is recorded when it passes. Then, per shard:

- only its stats or code counts damaged, its tar sound by sha256: both are rebuilt from the tar;
- otherwise: its record is rewritten with ``redo`` (its clips, from the record, else its stats, else
  its tar), and only then are its tar, stats and code counts removed. The files it held are no longer
  done, so the run tokenizes them again, in their planned batches (the same tokens), into shard ``N``;
- a damaged errors file: the same for the files it listed (decoded again: they fail again, or not).

A kill at any moment leaves either the damaged files or a record with ``redo``; the next run goes on
from either. Clips whose source audio is gone are listed in ``errors/`` with that reason.
"""

from __future__ import annotations

import json
import shlex
import time
from collections.abc import Iterable
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import webdataset as wds

from musiclm import atomic
from musiclm.integrity import DamagedFile, FileRecord, full_check, quick_check, read_record_file, require, write_records
from musiclm.shards.format import TokenInfo, TokenSample, file_key, shard_name

RECORDS_DIR = "checksums"
PLAN_RECORD = "plan"  # checksums/plan.json: plan.parquet
MANIFEST_RECORD = "manifest"  # checksums/manifest.json: manifest.parquet and manifest.json
DATA_KINDS = ("tar", "stats", "codes")  # the files of a shard's clips: damaged together, redone together
ARROW_ERRORS = (pa.ArrowException, OSError, ValueError)

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


# ---- the record layout -----------------------------------------------------------------------


def shard_files(name: str) -> dict[str, str]:
    """The files of shard ``name`` by kind (tar, stats, codes, errors), relative to the tokenized folder."""
    return {"tar": f"shards/{name}.tar", "stats": f"stats/{name}.parquet", "codes": f"stats/_codes/{name}.parquet", "errors": f"errors/{name}.parquet"}


def record_path(out: str | Path, name: str) -> Path:
    """``DIR/checksums/NAME.json``: the record of shard ``name`` (or of the plan, the manifest)."""
    return Path(out) / RECORDS_DIR / f"{name}.json"


def repair_advice(out: str | Path) -> str:
    """What to do about a damaged file of the tokenized folder ``out``: rerun the command that wrote it
    (as its manifest recorded it, with ``--out`` pointing here), which repairs it."""
    out = Path(out)
    try:
        command = [str(a) for a in json.loads((out / "manifest.json").read_text())["command"]]
    except (OSError, ValueError, KeyError, TypeError):
        command = []
    if command[:2] != ["musiclm", "tokenize"]:
        return f"re-run musiclm tokenize CORPUS --out {out} (with the options that wrote it) to repair it"
    args = []
    for i, a in enumerate(command):
        if a.startswith("--out="):
            a = f"--out={out}"
        elif i and command[i - 1] == "--out":
            a = str(out)
        args.append("CORPUS" if a == "<path>" else a)
    return f"re-run {shlex.join(args)} to repair it"


def _stat(path: Path) -> list[int]:
    st = path.stat()
    return [st.st_mtime_ns, st.st_ctime_ns]


def _recorded_problem(path: Path, record: FileRecord, stat: list[int] | None, full: bool = False) -> str | None:
    """The problem of a recorded file: the quick check, then its hash when its times moved since ``stat``
    was taken (or always with ``full``); None when it is sound."""
    problem = quick_check(path, record)
    if problem is None and (full or stat != _stat(path)):
        problem = full_check(path, record)
    return problem


@dataclass
class ShardRecord:
    """The record file of one shard index (see the module docstring)."""

    name: str
    files: dict[str, FileRecord] = field(default_factory=dict)
    stat: dict[str, list[int]] = field(default_factory=dict)
    clips: list[list] = field(default_factory=list)  # [source, batch, [keys]]
    errors: list[list] = field(default_factory=list)  # [key, source]
    redo: dict[str, Any] | None = None

    @classmethod
    def read(cls, out: str | Path, name: str) -> ShardRecord | None:
        """The record of shard ``name``; None when there is none; :class:`DamagedFile` when it is damaged."""
        try:
            files, body = read_record_file(record_path(out, name))
        except FileNotFoundError:
            return None
        except DamagedFile as e:
            raise DamagedFile(e.path, e.problem, repair_advice(out)) from None
        try:
            return cls(name, files, dict(body.get("stat") or {}), list(body.get("clips") or []), list(body.get("errors") or []), body.get("redo"))
        except (TypeError, ValueError):
            raise DamagedFile(record_path(out, name), "unreadable record file", repair_advice(out)) from None

    def write(self, out: str | Path) -> None:
        (Path(out) / RECORDS_DIR).mkdir(parents=True, exist_ok=True)
        extra = {"shard": self.name, "stat": self.stat, "clips": self.clips, "errors": self.errors, "redo": self.redo}
        write_records(record_path(out, self.name), self.files, extra)

    def note(self, out: Path, rel: str) -> None:
        """Record the file ``rel`` as it is now."""
        self.files[rel] = FileRecord.of(out / rel)
        self.stat[rel] = _stat(out / rel)

    def forget(self, rel: str) -> None:
        self.files.pop(rel, None)
        self.stat.pop(rel, None)

    def batches(self) -> dict[str, int]:
        """{source: planned batch} of the clips this record knows (held or to redo); -1 when unknown."""
        out = {src: int(b) for src, b, _ in self.clips}
        for src, b, _ in (self.redo or {}).get("clips", []):
            out.setdefault(src, int(b))
        return out

    def drop_settled(self, keys: AbstractSet[str], sources: AbstractSet[str] = frozenset()) -> bool:
        """Remove from ``redo`` the clips whose key is in ``keys`` and the failed files whose key is in ``keys``
        or whose source is in ``sources``; clear it when nothing is left. True when it changed."""
        if not self.redo:
            return False
        before = json.dumps(self.redo, sort_keys=True)
        clips = [[src, b, [k for k in ks if k not in keys]] for src, b, ks in self.redo["clips"]]
        self.redo["clips"] = [c for c in clips if c[2]]
        self.redo["errors"] = [[k, src] for k, src in self.redo["errors"] if k not in keys and src not in sources]
        if not self.redo["clips"] and not self.redo["errors"] and not self.redo["unknown"]:
            self.redo = None
        return json.dumps(self.redo, sort_keys=True) != before


def _membership(samples: Iterable[TokenSample], batch_of: dict[str, int]) -> list[list]:
    """``[[source, batch, [keys]], ...]`` of ``samples``, sources in order of first appearance."""
    groups: dict[str, list] = {}
    for s in samples:
        src = str(s.meta.get("source", ""))
        groups.setdefault(src, [src, int(batch_of.get(s.key, -1)), []])[2].append(s.key)
    return list(groups.values())


def _add_redo(rec: ShardRecord, clips: list[list] | None = None, errors: list[list] | None = None, unknown: bool = False, problems: dict[str, str] | None = None) -> None:
    redo = rec.redo or {"clips": [], "errors": [], "unknown": False, "problems": {}}
    redo["clips"] = redo["clips"] + (clips or [])
    redo["errors"] = redo["errors"] + (errors or [])
    redo["unknown"] = bool(redo["unknown"] or unknown)
    redo["problems"] = {**redo["problems"], **(problems or {})}
    rec.redo = redo


# ---- writing ---------------------------------------------------------------------------------


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
        from musiclm.shards.stats import write_shard_stats

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
            rec.clips = _membership(self.samples, self.batch_of)
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
            rec.stat[rels["tar"]] = _stat(tar_final)
            self.shards_written += 1
        rec.write(self.out)
        self.samples, self.errors, self.batch_of = [], [], {}
        self.index += 1

    def close(self) -> None:
        self.flush()


def record_folder_files(out: str | Path, name: str, rels: Iterable[str]) -> None:
    """Record the folder-level files ``rels`` (plan.parquet; manifest.parquet and manifest.json) as
    ``DIR/checksums/NAME.json``, after they were written."""
    out = Path(out)
    (out / RECORDS_DIR).mkdir(parents=True, exist_ok=True)
    rels = [r for r in rels if (out / r).is_file()]
    write_records(record_path(out, name), {r: FileRecord.of(out / r) for r in rels}, {"stat": {r: _stat(out / r) for r in rels}})


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


# ---- reading, checked ------------------------------------------------------------------------


def recorded_files(out: str | Path, kinds: Iterable[str] = ("tar", "stats", "codes", "errors")) -> dict[str, FileRecord]:
    """{path: record} of the files of ``kinds`` that the shard records of ``out`` name; every record is
    read once and only these entries are kept. :class:`DamagedFile` for a damaged record."""
    out = Path(out)
    kinds = tuple(kinds)
    found: dict[str, FileRecord] = {}
    for path in sorted((out / RECORDS_DIR).glob("shard-*.json")):
        rec = ShardRecord.read(out, path.stem)
        rels = shard_files(path.stem)
        found.update({rels[k]: rec.files[rels[k]] for k in kinds if rec is not None and rels[k] in rec.files})
    return found


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


# ---- structural reads (files without a record) -----------------------------------------------


def read_tar_samples(path: str | Path) -> list[TokenSample]:
    """Every clip of a shard tar, in tar order, every member parsed (``.npy`` headers against their data);
    ValueError (or tarfile's errors) when the tar does not read whole."""
    import tarfile

    from webdataset.tariterators import base_plus_ext

    groups: dict[str, dict[str, Any]] = {}
    with tarfile.open(path) as tf:
        for member in tf:
            if not member.isfile():
                continue
            base, ext = base_plus_ext(member.name)
            if base is None:
                continue
            data = tf.extractfile(member).read()
            if len(data) != member.size:
                raise ValueError(f"member {member.name} is cut short")
            groups.setdefault(base, {"__key__": base})[ext] = data
    return [TokenSample.from_wds(g) for g in groups.values()]


_READ_ERRORS = (*ARROW_ERRORS, KeyError, EOFError, TypeError)


def structural_problem(path: Path, kind: str) -> str | None:
    """What is wrong with a file of ``kind`` (tar, stats, codes, errors) that has no record, found by
    reading it whole; None when it reads."""
    import tarfile

    from musiclm.shards.stats import CLIP_SCHEMA, CODES_SCHEMA

    problem = quick_check(path, None)
    if problem is not None:
        return problem
    try:
        if kind == "tar":
            read_tar_samples(path)
        else:
            schema = {"stats": CLIP_SCHEMA, "codes": CODES_SCHEMA, "errors": ERROR_SCHEMA}[kind]
            t = pq.read_table(path)
            if t.schema.names != schema.names:
                return f"not a {kind} file (columns {', '.join(t.schema.names)})"
    except (*_READ_ERRORS, tarfile.TarError) as e:
        return f"unreadable: {type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}".rstrip(": ")
    return None


def _clips_of_stats(path: Path, batch_of: dict[str, int]) -> list[list]:
    """The clips of a stats file by source (``[[source, batch, [keys]], ...]``); [] when it does not read."""
    try:
        t = pq.read_table(path, columns=["key", "source"])
    except ARROW_ERRORS:
        return []
    groups: dict[str, list] = {}
    for key, src in zip(t.column("key").to_pylist(), t.column("source").to_pylist()):
        groups.setdefault(src, [src, int(batch_of.get(src, -1)), []])[2].append(key)
    return list(groups.values())


def _clips_of_tar(path: Path, batch_of: dict[str, int]) -> list[list]:
    """The clips of a tar by their json members (keys and sources), reading as far as it reads."""
    import tarfile

    groups: dict[str, list] = {}
    try:
        with tarfile.open(path) as tf:
            for member in tf:
                if member.isfile() and member.name.endswith(".json"):
                    key = member.name.split("/")[-1].split(".", 1)[0]
                    src = str(json.loads(tf.extractfile(member).read()).get("source", ""))
                    groups.setdefault(src, [src, int(batch_of.get(src, -1)), []])[2].append(key)
    except (*_READ_ERRORS, tarfile.TarError):
        pass
    return list(groups.values())


def _errors_of(path: Path) -> list[list]:
    try:
        t = pq.read_table(path, columns=["key", "source"])
    except ARROW_ERRORS:
        return []
    return [[k, s] for k, s in zip(t.column("key").to_pylist(), t.column("source").to_pylist())]


# ---- checking a whole folder and preparing repairs --------------------------------------------


@dataclass
class Found:
    """One shard index whose files were not as recorded, and what was done about it."""

    name: str
    problems: dict[str, str]  # path -> what is wrong
    actions: list[str]  # "redo": its clips or failed files are to be done again; "rebuilt": its stats, from the tar; "recorded": read whole and recorded


@dataclass
class FolderState:
    """What :func:`check_shards` found and left: sound records, and what was damaged."""

    records: dict[str, ShardRecord]  # shard name -> its record, as rewritten
    found: list[Found]  # damaged shards found by this check
    recorded: list[str]  # shards without a record that read whole and are recorded now

    def file_records(self) -> dict[str, FileRecord]:
        return {rel: fr for rec in self.records.values() for rel, fr in rec.files.items()}

    def redo(self) -> dict[str, dict[str, Any]]:
        """{shard name: its redo} of every shard with something still to redo (found now or by a killed run)."""
        return {name: rec.redo for name, rec in self.records.items() if rec.redo}

    def batches(self) -> dict[str, int]:
        """{source: planned batch} as the records know it (a lost plan is rebuilt from these)."""
        out: dict[str, int] = {}
        for rec in self.records.values():
            out.update({src: b for src, b in rec.batches().items() if b >= 0})
        return out


def _shard_names(out: Path) -> list[str]:
    names = {p.stem for p in (out / RECORDS_DIR).glob("shard-*.json")}
    for pattern in ("shards/shard-*.tar", "stats/shard-*.parquet", "stats/_codes/shard-*.parquet", "errors/shard-*.parquet"):
        names.update(p.stem for p in out.glob(pattern))
    return sorted(names)


def check_shards(out_dir: str | Path, batch_of: dict[str, int] | None = None, full: bool = False) -> FolderState:
    """Check every shard of ``out_dir`` against its record and prepare the repair of damaged ones (see the
    module docstring): rewrite records, rebuild stats from sound tars, remove damaged files after their
    clips were written into ``redo``. ``batch_of``: {source: planned batch} from the plan, for the
    records of shards that had none. A file is hashed when its times moved since it was recorded, or
    always with ``full`` (damage that left size and times alone: bit rot). Call before :func:`clean_unfinished`."""
    out = Path(out_dir)
    batch_of = batch_of or {}
    state = FolderState({}, [], [])
    for name in _shard_names(out):
        rels = shard_files(name)
        on_disk = {kind for kind, rel in rels.items() if (out / rel).is_file()}
        problems: dict[str, str] = {}
        try:
            rec, had_record = ShardRecord.read(out, name), True
        except DamagedFile as e:
            rec, had_record = None, False
            problems[record_path(out, name).relative_to(out).as_posix()] = e.problem
        if rec is None:
            if not problems and not on_disk & {"tar", "errors"}:
                continue  # stats of a shard killed before its tar was renamed: clean_unfinished removes them
            rec, had_record = ShardRecord(name), False
            if problems and not on_disk & {"tar", "errors"}:
                _add_redo(rec, unknown=True, problems=problems)  # its record is all that was left, and it is lost
        before = json.dumps([rec.files, rec.stat, rec.clips, rec.errors, rec.redo], sort_keys=True, default=str)
        for rel, fr in list(rec.files.items()):
            path = out / rel
            problem = _recorded_problem(path, fr, rec.stat.get(rel), full)
            if problem is None:
                rec.stat[rel] = _stat(path)  # hashed when its times moved: they are the record's now
            else:
                problems[rel] = problem
        redo = rec.redo or {}
        for kind in ("tar", "stats", "codes", "errors"):
            stale = redo.get("errors") if kind == "errors" else (redo.get("clips") or redo.get("unknown"))
            if kind in on_disk and rels[kind] not in rec.files and stale:
                (out / rels[kind]).unlink()  # a damaged file already on record as to redo: a kill came before it went
                on_disk.discard(kind)
        tar_there = rels["tar"] in rec.files or "tar" in on_disk
        for kind in ("tar", "stats", "codes", "errors"):
            rel = rels[kind]
            if rel in rec.files or (kind in ("stats", "codes") and not tar_there):
                continue  # recorded (checked above), or leftovers of a killed run
            if kind not in on_disk:
                if kind in ("stats", "codes") and tar_there:
                    problems[rel] = "missing"
                continue
            problem = structural_problem(out / rel, kind)
            if problem is None:
                rec.note(out, rel)
            else:
                problems[rel] = problem
        sound = lambda kind: rels[kind] in rec.files and rels[kind] not in problems  # noqa: E731
        if sound("errors") and not rec.errors:
            rec.errors = _errors_of(out / rels["errors"])
        if sound("tar") and not rec.clips:
            rec.clips = _clips_of_stats(out / rels["stats"], batch_of) if sound("stats") else _clips_of_tar(out / rels["tar"], batch_of)
        data_bad = {rels[k]: problems[rels[k]] for k in DATA_KINDS if rels[k] in problems}
        actions = [] if had_record else ["recorded"]
        if data_bad and sound("tar") and had_record:  # the stats are to be rebuilt from the tar only if it is whole
            problem = full_check(out / rels["tar"], rec.files[rels["tar"]])
            if problem is not None:
                problems[rels["tar"]] = data_bad[rels["tar"]] = problem
        if data_bad and sound("tar"):
            _rebuild_stats(out, name, rec)  # the tokens are intact: only their statistics were damaged
            actions.append("rebuilt")
        elif data_bad:
            if rec.clips:
                clips, unknown = rec.clips, False
            elif "stats" in on_disk and rels["stats"] not in problems:
                clips, unknown = _clips_of_stats(out / rels["stats"], batch_of), False
            else:
                clips = _clips_of_tar(out / rels["tar"], batch_of) if "tar" in on_disk else []
                unknown = not clips or rels["tar"] in problems  # a damaged tar may have lost some of its clips' names
            _add_redo(rec, clips=clips, unknown=unknown, problems=data_bad)
            for kind in DATA_KINDS:
                rec.forget(rels[kind])
            rec.clips = []
            actions.append("redo")
        if rels["errors"] in problems:
            errors = rec.errors or []
            _add_redo(rec, errors=errors, unknown=not errors, problems={rels["errors"]: problems[rels["errors"]]})
            rec.forget(rels["errors"])
            rec.errors = []
            actions.append("redo")
        if rec.redo and rec.redo.get("unknown") and "redo" not in actions and problems:
            actions.append("redo")
        after = json.dumps([rec.files, rec.stat, rec.clips, rec.errors, rec.redo], sort_keys=True, default=str)
        if after != before or not had_record:
            rec.write(out)  # before any file goes: a kill from here on leaves the redo on record
        if "redo" in actions:
            for kind in ("tar", "stats", "codes", "errors"):
                if rels[kind] not in rec.files:
                    (out / rels[kind]).unlink(missing_ok=True)
        if problems:
            state.found.append(Found(name, problems, actions))
        elif actions == ["recorded"] and rec.files:
            state.recorded.append(name)
        state.records[name] = rec
    return state


def _rebuild_stats(out: Path, name: str, rec: ShardRecord) -> None:
    """Write the stats and code counts of shard ``name`` again from its (sound) tar, and record them."""
    from musiclm.shards.stats import write_shard_stats

    rels = shard_files(name)
    samples = read_tar_samples(out / rels["tar"])
    write_shard_stats(out / "stats", name, samples, TokenInfo.load(out))
    for kind in ("stats", "codes"):
        rec.note(out, rels[kind])
    if not rec.clips:
        rec.clips = _membership(samples, {})


def settle(out_dir: str | Path, state: FolderState, records: dict[str, FileRecord] | None = None) -> None:
    """Drop from every ``redo`` what is settled now (clips in finished shards, keys and files in errors).
    Records are read again: a repair writes them as it goes."""
    out = Path(out_dir)
    names = list(state.redo())
    if not names:
        return
    keys = done_keys(out, records)
    sources = done_files(out, records)
    for name in names:
        rec = ShardRecord.read(out, name) or ShardRecord(name)
        if rec.drop_settled(keys, sources):
            rec.write(out)
        state.records[name] = rec


def list_unrepairable(out_dir: str | Path, state: FolderState, info: TokenInfo, keep: AbstractSet[str], reason: str, step: str = "repair") -> list[tuple[str, str, str]]:
    """Write into ``errors/`` (a new index) every clip and failed file still to redo whose source is not in
    ``keep``, with ``reason`` (``{shard}`` is replaced by the damaged shard's name), and drop them from the
    redo. Returns the (key, source, shard name) of each row listed."""
    out = Path(out_dir)
    rows: list[tuple[str, str, str]] = []
    for name, redo in state.redo().items():
        rows += [(k, src, name) for src, _, keys in redo["clips"] if src not in keep for k in keys]
        rows += [(k, src, name) for k, src in redo["errors"] if src not in keep]
    if not rows:
        return []
    writer = ShardWriter(out, info, 1 << 62, next_shard_index(out))
    for key, src, name in rows:
        writer.add_error(key, src, step, reason.format(shard=name))
    writer.close()
    listed = {k for k, _, _ in rows}
    for name in state.redo():
        rec = ShardRecord.read(out, name) or ShardRecord(name)
        if rec.drop_settled(listed):
            rec.write(out)
        state.records[name] = rec
    return rows


def folder_problems(out_dir: str | Path, name: str, rels: Iterable[str]) -> dict[str, str]:
    """{path: problem} of the folder-level files ``rels`` recorded in ``checksums/NAME.json`` (quick checks;
    a full hash of a file whose times moved). A file without a record is read whole; a damaged record is
    a problem of its own."""
    out = Path(out_dir)
    rels = list(rels)
    try:
        records, body = read_record_file(record_path(out, name), repair_advice(out))
    except FileNotFoundError:
        records, body = {}, {}
    except DamagedFile as e:
        return {record_path(out, name).relative_to(out).as_posix(): e.problem}
    stat = body.get("stat") or {}
    problems: dict[str, str] = {}
    for rel in rels:
        path, fr = out / rel, records.get(rel)
        if fr is None:
            problem = None if not path.is_file() else quick_check(path, None)
            if problem is None and path.suffix == ".parquet" and path.is_file():
                try:
                    pq.read_table(path)
                except ARROW_ERRORS as e:
                    problem = f"unreadable: {type(e).__name__}"
        else:
            problem = _recorded_problem(path, fr, stat.get(rel))
        if problem is not None:
            problems[rel] = problem
    return problems


def require_recorded(out_dir: str | Path, name: str, rel: str) -> Path:
    """``DIR/rel`` once it passes a quick check against the record ``checksums/NAME.json`` keeps of it (when the
    folder keeps one: a run folder's copy of the manifest has none); :class:`DamagedFile` otherwise."""
    out = Path(out_dir)
    path = record_path(out, name)
    if not path.is_file():
        return out / rel
    records, _ = read_record_file(path, repair_advice(out))
    return require(out / rel, records.get(rel), repair_advice(out))


# ---- what musiclm verify expects ---------------------------------------------------------------


def expected_files(out_dir: str | Path) -> dict[str, tuple[FileRecord | None, str]]:
    """Every file a tokenized folder should hold, relative to it (``tokenizer/`` aside): ``{path: (record,
    advice)}`` for :func:`musiclm.integrity.check_files`.

    Files named by a shard record carry their record; record files themselves None (they check their
    own digest); shard files and plan/manifest files that no record names carry
    :data:`~musiclm.integrity.UNRECORDED`; the files of a shard whose record is damaged, None (quick
    checks only). A shard whose repair is under way expects its tar (or errors file) until it is redone.
    """
    from musiclm.integrity import UNRECORDED

    out = Path(out_dir)
    advice = repair_advice(out)
    unrecorded = advice.replace("to repair it", "to check and record it")
    expected: dict[str, tuple[FileRecord | None, str]] = {}
    covered: set[str] = set()
    for path in sorted((out / RECORDS_DIR).glob("*.json")):
        rel = path.relative_to(out).as_posix()
        expected[rel] = (None, advice)
        try:
            records, body = read_record_file(path, advice)
        except DamagedFile:
            if path.stem.startswith("shard-"):
                covered.update(shard_files(path.stem).values())  # quick checks only, below
            continue
        for name, fr in records.items():
            expected[name] = (fr, advice)
        redo = body.get("redo")
        if redo:
            rels = shard_files(path.stem)
            if redo.get("clips") or redo.get("unknown"):
                expected.setdefault(rels["tar"], (None, advice))
            if redo.get("errors"):
                expected.setdefault(rels["errors"], (None, advice))
    on_disk = [p for pattern in ("shards/shard-*.tar", "stats/shard-*.parquet", "stats/_codes/shard-*.parquet", "errors/shard-*.parquet") for p in out.glob(pattern)]
    on_disk += [out / n for n in ("plan.parquet", "manifest.parquet", "manifest.json")]
    for path in on_disk:
        rel = path.relative_to(out).as_posix()
        if rel in expected or not path.is_file():
            continue
        expected[rel] = (None, advice) if rel in covered else (UNRECORDED, unrecorded)
    return expected

