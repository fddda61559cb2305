"""Checksums of the files musiclm writes: recorded when a file is written, checked when it is read.

Every file the project writes (shards, stats and errors Parquet files, tokenizer
arrays and backbones, checkpoint weights and optimizer state) has a
:class:`FileRecord`: its size in bytes and its sha256. Records live in small JSON
*record files* (:func:`write_records` / :func:`read_records`) beside what they
describe; which record file holds which files is the business of the folder's
own module (shards/records.py, pipeline/tokenizer.py, training/checkpoint.py).

Two depths of check:

- :func:`quick_check`, on every read: the size against the record plus the
  format's own end marker (:func:`end_marker_problem`). A few bytes read; it
  catches truncation and most partial copies, not a flipped byte in the middle.
- :func:`full_check`, at ``musiclm verify`` (and where a file is small): the
  sha256 against the record. Catches everything.

A record file checks itself: its ``record_sha256`` is the sha256 of the file's
own bytes with that field's value zeroed, so a flipped byte inside a record file
is told apart from a damaged file it describes (:func:`end_marker_problem` checks
it for every record file, :func:`read_record_file` when reading one).

A damaged file reaches the user as :class:`DamagedFile`, a :class:`UserError`:
one line naming the file, what is wrong and what to do, exit code 2.

Layer: base.
"""

from __future__ import annotations

import hashlib
import json
import struct
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

from musiclm import atomic
from musiclm.digest import file_digest
from musiclm.errors import UserError

RECORD_FORMAT = 1


@dataclass(frozen=True)
class FileRecord:
    """What a file was when it was written."""

    bytes: int
    sha256: str

    @classmethod
    def of(cls, path: str | Path) -> FileRecord:
        size, digest = file_digest(path)
        return cls(size, digest)

    def to_json(self) -> dict[str, Any]:
        return {"bytes": self.bytes, "sha256": self.sha256}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> FileRecord:
        return cls(int(d["bytes"]), str(d["sha256"]))


class DamagedFile(UserError):
    """A file that does not match its record (or cannot be read as its format)."""

    def __init__(self, path: str | Path, problem: str | None = None, advice: str = ""):
        self.path, self.problem, self.advice = Path(path), problem, advice
        # one argument: a message re-raised by its type alone (as DataLoader workers re-raise)
        super().__init__(str(path) if problem is None else f"{path} is damaged ({problem}): {advice}")


def read_json(path: str | Path, advice: str) -> Any:
    """The parsed JSON file ``path``; :class:`DamagedFile` when it does not parse (call it on a file that exists)."""
    try:
        return json.loads(Path(path).read_bytes())
    except ValueError:  # UnicodeDecodeError included
        raise DamagedFile(path, "not valid JSON", advice) from None


# ---- record files ----------------------------------------------------------------

_SELF = b'"record_sha256": "'  # the record file's own digest; written first, so found at once
_ZEROS = b"0" * 64


def _self_digest(data: bytes) -> tuple[str | None, str | None]:
    """(recorded, actual) self digest of a record file's bytes; (None, None) for a file without one."""
    at = data.find(_SELF)
    if at < 0:
        return None, None
    start = at + len(_SELF)
    recorded = data[start : start + 64].decode("ascii", errors="replace")
    return recorded, hashlib.sha256(data[:start] + _ZEROS + data[start + 64 :]).hexdigest()


def write_records(path: str | Path, records: dict[str, FileRecord], extra: dict[str, Any] | None = None) -> None:
    """Write ``{name: record}`` atomically as JSON, with the file's own digest (see the module docstring).

    Names are relative to the folder the record file's owner says (the record file's folder, or for a
    tokenized folder its root). ``extra``: more JSON-serialisable fields the owner keeps with the records.
    """
    body: dict[str, Any] = {"record_sha256": _ZEROS.decode(), "format": RECORD_FORMAT}
    body["files"] = {name: r.to_json() for name, r in sorted(records.items())}
    body.update(extra or {})
    data = (json.dumps(body, ensure_ascii=False) + "\n").encode("utf-8")  # one line: shard records list thousands of keys
    _, digest = _self_digest(data)
    start = data.find(_SELF) + len(_SELF)
    tmp = atomic.temp_path(Path(path))
    tmp.write_bytes(data[:start] + digest.encode("ascii") + data[start + 64 :])
    atomic.fsync_replace(tmp, Path(path))


def read_record_file(path: str | Path, advice: str = "re-run the command that wrote this folder") -> tuple[dict[str, FileRecord], dict[str, Any]]:
    """(records, the whole JSON body) of a record file; FileNotFoundError when there is none;
    :class:`DamagedFile` (with ``advice``) when it cannot be read or its own digest differs."""
    path = Path(path)
    data = path.read_bytes()
    recorded, actual = _self_digest(data)
    if recorded != actual:
        raise DamagedFile(path, "the record file's own checksum differs", advice)
    try:
        body = json.loads(data)
        return {name: FileRecord.from_json(d) for name, d in body["files"].items()}, body
    except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError) as e:
        raise DamagedFile(path, f"unreadable record file: {type(e).__name__}", advice) from None


def read_records(path: str | Path) -> dict[str, FileRecord]:
    """The records of a record file; :class:`DamagedFile` when it cannot be read (it is damaged itself)."""
    return read_record_file(path)[0]


# ---- end markers -----------------------------------------------------------------

_TAR_END = 1024  # a tar archive ends with two 512-byte zero blocks


def _tail(path: Path, n: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(0, 2)
        size = f.tell()
        f.seek(max(0, size - n))
        return f.read()


def end_marker_problem(path: str | Path) -> str | None:
    """What is wrong with the framing of ``path`` by its suffix (None when it looks whole, or the
    format has no marker): .tar (zero end blocks), .parquet (``PAR1`` at both ends), .safetensors
    (the header fits in the file), .npy (the header's shape fills the file exactly), .json (parses)."""
    path = Path(path)
    suffix = path.suffix
    size = path.stat().st_size
    if suffix == ".tar":
        if size < _TAR_END or size % 512:
            return f"truncated: {size} bytes is not a whole tar archive"
        if _tail(path, _TAR_END) != bytes(_TAR_END):
            return "truncated: the tar end-of-archive blocks are missing"
    elif suffix == ".parquet":
        with open(path, "rb") as f:
            head = f.read(4)
        if size < 12 or head != b"PAR1" or _tail(path, 4) != b"PAR1":
            return "truncated or overwritten: the Parquet markers (PAR1) are missing"
    elif suffix == ".safetensors":
        with open(path, "rb") as f:
            head = f.read(8)
            n = struct.unpack("<Q", head)[0] if len(head) == 8 else size
            if 8 + n > size:
                return "safetensors header runs past the end"
            try:
                tensors = json.loads(f.read(n))
                data = max((int(t["data_offsets"][1]) for k, t in tensors.items() if k != "__metadata__"), default=0)
            except (ValueError, KeyError, TypeError, IndexError, UnicodeDecodeError):
                return "unreadable safetensors header"
        if 8 + n + data != size:
            return f"safetensors holds {size - 8 - n} data bytes, its header says {data}"
    elif suffix == ".npy":
        import numpy as np

        fmt = np.lib.format
        try:
            with open(path, "rb") as f:
                version = fmt.read_magic(f)
                read_header = fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0
                shape, _, dtype = read_header(f)
                data = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
                header = f.tell()
        except (ValueError, OSError, SyntaxError) as e:
            return f"unreadable npy header ({type(e).__name__})"
        if header + data != size:
            return f"npy holds {size - header} data bytes, its header says {data}"
    elif suffix == ".json":
        data = path.read_bytes()
        try:
            json.loads(data)
        except (ValueError, UnicodeDecodeError):
            return "not valid JSON"
        recorded, actual = _self_digest(data)
        if recorded != actual:
            return "the record file's own checksum differs"
    return None


# ---- checks ----------------------------------------------------------------------


def quick_check(path: str | Path, record: FileRecord | None) -> str | None:
    """The problem with ``path`` found cheaply (missing, end marker, size differs from the record), or None.
    The end marker first: a cut file is told as truncated, a whole file of another size by its size."""
    path = Path(path)
    if not path.is_file():
        return "missing"
    problem = end_marker_problem(path)
    size = path.stat().st_size
    if problem is None and record is not None and record is not UNRECORDED and size != record.bytes:
        return f"{size} bytes, recorded {record.bytes}"
    return problem


UNRECORDED = FileRecord(-1, "unrecorded")
"""The record of a file that should have one and has none (written before records were kept, or by a run
killed before it recorded the file): checks treat it as no record; :func:`check_files` reports such a file."""


def full_check(path: str | Path, record: FileRecord) -> str | None:
    """The problem with ``path`` against its record, hashing every byte; None when it matches."""
    problem = quick_check(path, record)
    if problem is not None or record is UNRECORDED:
        return problem
    if FileRecord.of(path).sha256 != record.sha256:
        return "sha256 differs from the record"
    return None


def require(path: str | Path, record: FileRecord | None, advice: str, full: bool = False) -> Path:
    """``path`` when it passes :func:`quick_check` (or :func:`full_check` with ``full``), else :class:`DamagedFile`."""
    problem = full_check(path, record) if full and record is not None else quick_check(path, record)
    if problem == "missing":
        raise UserError(f"{path} is missing: {advice}")
    if problem is not None:
        raise DamagedFile(path, problem, advice)
    return Path(path)


@dataclass(frozen=True)
class Finding:
    """One file that is not as recorded: ``status`` is damaged, missing, unrecorded or unexpected."""

    path: str  # relative to the verified folder
    status: str
    detail: str
    advice: str = ""

    def to_json(self) -> dict[str, str]:
        return {"path": self.path, "status": self.status, "detail": self.detail, "advice": self.advice}


def check_files(
    root: str | Path,
    expected: dict[str, tuple[FileRecord | None, str]],
    present: Iterable[str],
    workers: int | None = None,
    progress: Callable[[int], None] | None = None,
) -> list[Finding]:
    """Full checks of many files in parallel.

    ``expected``: relative path -> (record, advice); a None record means only that the file must
    exist and be whole (:func:`quick_check`); :data:`UNRECORDED` that too, and the file is reported
    as unrecorded when it is whole. ``present``: every relative path found under ``root``;
    those not expected are reported as unexpected. ``progress(n)`` is called after each file.
    Findings are sorted by path.
    """
    import os

    root = Path(root)
    findings = [Finding(p, "unexpected", "not in any record") for p in sorted(set(present) - set(expected))]

    def one(item: tuple[str, tuple[FileRecord | None, str]]) -> Finding | None:
        rel, (record, advice) = item
        path = root / rel
        problem = full_check(path, record) if record is not None else quick_check(path, None)
        if problem is None and record is UNRECORDED:
            return Finding(rel, "unrecorded", "no checksum recorded", advice)
        return None if problem is None else Finding(rel, "missing" if problem == "missing" else "damaged", problem, advice)

    with ThreadPoolExecutor(max_workers=workers or os.cpu_count() or 1) as pool:
        for found in pool.map(one, sorted(expected.items())):
            if found is not None:
                findings.append(found)
            if progress is not None:
                progress(1)
    return sorted(findings, key=lambda f: f.path)
