"""Checksum records of a tokenized folder: which files a shard holds, their bytes and sha256.

The files of shard ``N`` (paths relative to the tokenized folder ``DIR``, :func:`shard_files`)::

    shards/shard-N.tar              the clips (WebDataset)
    stats/shard-N.parquet           one row per clip
    stats/_codes/shard-N.parquet    per-code counts
    errors/shard-N.parquet          files that failed while shard N was filled
    checksums/shard-N.json          the record of all of the above

**The record** ``checksums/shard-N.json`` (:func:`~musiclm.integrity.write_records`, names relative to
``DIR``; records have a folder of their own so that Parquet dataset reads of ``stats/`` and ``errors/``
never see them) holds, besides ``files`` (bytes and sha256 of each file of the shard that exists):

- ``stat``: ``{path: [mtime_ns, ctime_ns]}`` when the file was recorded or last hashed whole;
- ``clips``: ``[[source, planned batch or -1, [keys in tar order]], ...]``, the tar's clips by source file;
- ``errors``: ``[[key, source], ...]``, the rows of the errors file;
- ``redo``: null, or what a repair has still to redo: ``{"clips": [...], "errors": [...], "unknown": bool,
  "problems": {path: what was wrong}}`` (``unknown``: a damaged shard whose clips could not be read).

So which clips a shard held is known from its record even when every other file of it is lost. The
folder-level files (plan.parquet; manifest.parquet and manifest.json) have records of their own
(:func:`record_folder_files`). Who writes the records: :mod:`musiclm.shards.writer`; who acts on a
file that does not match its record: :mod:`musiclm.shards.repair`, with :func:`repair_advice`.

Layer: shards (imports only the base layer).
"""

from __future__ import annotations

import json
import shlex
from collections.abc import Iterable
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from musiclm.integrity import DamagedFile, FileRecord, full_check, quick_check, read_record_file, require, write_records
from musiclm.shards.format import TokenSample

RECORDS_DIR = "checksums"
PLAN_RECORD = "plan"  # checksums/plan.json: plan.parquet
MANIFEST_RECORD = "manifest"  # checksums/manifest.json: manifest.parquet and manifest.json


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


def file_stat(path: Path) -> list[int]:
    """``[mtime_ns, ctime_ns]`` of ``path``: a file whose times moved since it was recorded is hashed again."""
    st = path.stat()
    return [st.st_mtime_ns, st.st_ctime_ns]


def recorded_problem(path: Path, record: FileRecord, stat: list[int] | None, full: bool = False) -> str | None:
    """The problem of a recorded file: the quick check, then its hash when its times moved since ``stat``
    was taken (or always with ``full``); None when it is sound."""
    problem = quick_check(path, record)
    if problem is None and (full or stat != file_stat(path)):
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
        self.stat[rel] = file_stat(out / rel)

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


def membership(samples: Iterable[TokenSample], batch_of: dict[str, int]) -> list[list]:
    """``[[source, batch, [keys]], ...]`` of ``samples``, sources in order of first appearance."""
    groups: dict[str, list] = {}
    for s in samples:
        src = str(s.meta.get("source", ""))
        groups.setdefault(src, [src, int(batch_of.get(s.key, -1)), []])[2].append(s.key)
    return list(groups.values())


def record_folder_files(out: str | Path, name: str, rels: Iterable[str]) -> None:
    """Record the folder-level files ``rels`` (plan.parquet; manifest.parquet and manifest.json) as
    ``DIR/checksums/NAME.json``, after they were written."""
    out = Path(out)
    (out / RECORDS_DIR).mkdir(parents=True, exist_ok=True)
    rels = [r for r in rels if (out / r).is_file()]
    write_records(record_path(out, name), {r: FileRecord.of(out / r) for r in rels}, {"stat": {r: file_stat(out / r) for r in rels}})


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
