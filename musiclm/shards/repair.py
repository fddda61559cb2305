"""Finding a tokenized folder's damaged shards and preparing their repair.

**Checking and repair** (:func:`check_shards`, at the start of every ``musiclm tokenize``). Every record
(:mod:`musiclm.shards.records`) is read once; every file it names gets a quick check (size and end
marker), and a full sha256 when its mtime or ctime moved since it was recorded: a file changed in place
by anything is hashed, untouched files are not (bit rot that leaves a file's times alone is for
``musiclm verify``). A file without a record gets a structural read (every member parsed) and is
recorded when it passes. Then, per shard:

- only its stats or code counts damaged, its tar sound by sha256: both are rebuilt from the tar;
- otherwise: its record is rewritten with ``redo`` (its clips, from the record, else its stats, else
  its tar), and only then are its tar, stats and code counts removed. The files it held are no longer
  done, so the run tokenizes them again, in their planned batches (the same tokens), into shard ``N``
  (:class:`~musiclm.shards.writer.ShardWriter` rewrites that index);
- a damaged errors file: the same for the files it listed (decoded again: they fail again, or not).

A kill at any moment leaves either the damaged files or a record with ``redo``; the next run goes on
from either. Clips whose source audio is gone are listed in ``errors/`` with that reason
(:func:`list_unrepairable`). The folder-level files (plan, manifest) are checked by
:func:`folder_problems`; what to tell the user about a damaged file is
:func:`~musiclm.shards.records.repair_advice`.

Layer: shards (imports the base layer and the shards modules below it: format, records, read, tar,
stats, writer).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from musiclm.integrity import DamagedFile, FileRecord, full_check, quick_check, read_record_file
from musiclm.shards.format import TokenInfo
from musiclm.shards.read import ARROW_ERRORS, done_files, done_keys
from musiclm.shards.records import (
    RECORDS_DIR,
    ShardRecord,
    file_stat,
    membership,
    record_path,
    recorded_problem,
    repair_advice,
    shard_files,
)
from musiclm.shards.stats import CLIP_SCHEMA, CODES_SCHEMA, write_shard_stats
from musiclm.shards.tar import read_tar_samples, tar_clip_sources
from musiclm.shards.writer import ERROR_SCHEMA, ShardWriter, next_shard_index

DATA_KINDS = ("tar", "stats", "codes")  # the files of a shard's clips: damaged together, redone together
_READ_ERRORS = (*ARROW_ERRORS, KeyError, EOFError, TypeError)


def structural_problem(path: Path, kind: str) -> str | None:
    """What is wrong with a file of ``kind`` (tar, stats, codes, errors) that has no record, found by
    reading it whole; None when it reads."""
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
    except _READ_ERRORS as e:
        return f"unreadable: {type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}".rstrip(": ")
    return None


def _by_source(clips: Iterable[tuple[str, str]], batch_of: dict[str, int]) -> list[list]:
    """``(key, source)`` pairs grouped as a record's clips: ``[[source, batch, [keys]], ...]``."""
    groups: dict[str, list] = {}
    for key, src in clips:
        groups.setdefault(src, [src, int(batch_of.get(src, -1)), []])[2].append(key)
    return list(groups.values())


def _clips_of_stats(path: Path, batch_of: dict[str, int]) -> list[list]:
    """The clips of a stats file by source (``[[source, batch, [keys]], ...]``); [] when it does not read."""
    try:
        t = pq.read_table(path, columns=["key", "source"])
    except ARROW_ERRORS:
        return []
    return _by_source(zip(t.column("key").to_pylist(), t.column("source").to_pylist()), batch_of)


def _clips_of_tar(path: Path, batch_of: dict[str, int]) -> list[list]:
    """The clips of a tar by their json members (keys and sources), reading as far as it reads."""
    return _by_source(tar_clip_sources(path), batch_of)


def _errors_of(path: Path) -> list[list]:
    try:
        t = pq.read_table(path, columns=["key", "source"])
    except ARROW_ERRORS:
        return []
    return [[k, s] for k, s in zip(t.column("key").to_pylist(), t.column("source").to_pylist())]


def _add_redo(rec: ShardRecord, clips: list[list] | None = None, errors: list[list] | None = None, unknown: bool = False, problems: dict[str, str] | None = None) -> None:
    redo = rec.redo or {"clips": [], "errors": [], "unknown": False, "problems": {}}
    redo["clips"] = redo["clips"] + (clips or [])
    redo["errors"] = redo["errors"] + (errors or [])
    redo["unknown"] = bool(redo["unknown"] or unknown)
    redo["problems"] = {**redo["problems"], **(problems or {})}
    rec.redo = redo


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
    always with ``full`` (damage that left size and times alone: bit rot). Call before
    :func:`~musiclm.shards.writer.clean_unfinished`.

    One function, read top to bottom per shard: the order of its steps (a record rewritten with its redo
    before any damaged file goes) is what makes a kill at any moment safe, so it is kept in one place."""
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
            problem = recorded_problem(path, fr, rec.stat.get(rel), full)
            if problem is None:
                rec.stat[rel] = file_stat(path)  # hashed when its times moved: they are the record's now
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
            # the tar last: once it is gone, so are the shard's other files that are off the record
            for kind in ("stats", "codes", "errors", "tar"):
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
    rels = shard_files(name)
    samples = read_tar_samples(out / rels["tar"])
    write_shard_stats(out / "stats", name, samples, TokenInfo.load(out))
    for kind in ("stats", "codes"):
        rec.note(out, rels[kind])
    if not rec.clips:
        rec.clips = membership(samples, {})


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
            problem = recorded_problem(path, fr, stat.get(rel))
        if problem is not None:
            problems[rel] = problem
    return problems
