"""The tokenizer folder's file contract: what ``DIR/tokenizer`` holds, and the checked reads of it.

``tokenizer/`` holds ``tokenizer.json`` (the record: backbone ids and revisions, rates, vocabularies,
the tokenize config and checksums; :func:`read_record`, its :func:`fingerprint`), the quantizer arrays
as plain ``.npy`` (:data:`QUANTIZER_FILES`, :func:`load_quantizers`) and, for backbones built offline
(``model = "random"``), the backbones themselves in ``clap/``, ``semantic/`` and ``codec/`` (``mert/`` and ``encodec/`` in folders written before the backbones were pluggable).
``records.json`` (a :mod:`musiclm.integrity` record file) holds the bytes and sha256 of every other
file, tokenizer.json included.

Loading checks them (:func:`check_folder`): tokenizer.json and the quantizer arrays are small and
hashed; the saved backbones, which can be large, get the cheap check (size and the safetensors header)
on every load and are hashed by ``musiclm verify`` (:func:`expected_files`). Backbones named by a hub
id are not in the folder and not checked here. A folder written before record files has no
records.json: its quantizers and backbones are checked against the sha256 sums tokenizer.json keeps
(their sizes were not recorded).

The pipeline writes the folder (:meth:`musiclm.pipeline.tokenizer.Tokenizer.save`); everyone else
(training, hub, generation, verify, metrics) reads it through this module.

Layer: shards (imports only the base layer and :mod:`musiclm.shards.format`).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np

from musiclm.errors import UserError
from musiclm.integrity import UNRECORDED, DamagedFile, FileRecord, read_json, read_records, require
from musiclm.shards.format import TOKENIZER_FILE

FORMAT_VERSION = 3  # 3: full-length segments, batched backbones, tokenize.precision; 2: the dense CLAP fit
QUANTIZER_FILES = {
    "semantic_centroids": "semantic_kmeans.npy",  # [K, D]
    "semantic_norm": "semantic_norm.npy",  # [2, D]: mean, std of the semantic features
    "clap_codebooks": "clap_rvq.npy",  # [L, K, D]
}
RECORDS_FILE = "records.json"  # bytes and sha256 of every other file of the folder
ADVICE = "copy the tokenized corpus's DIR/tokenizer folder over this one (musiclm train copies it into each run), or re-run musiclm tokenize"


def fingerprint(record: dict[str, Any]) -> str:
    """What makes tokens mean the same thing: config, backbone identities and weights, quantizer arrays."""
    keep = {k: record[k] for k in ("format", "config", "backbones", "quantizers", "streams")}
    return hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()[:16]


def tokenizer_folder(path: str | Path) -> Path:
    """``path`` itself if it holds tokenizer.json, else ``path/tokenizer`` (a tokenized corpus folder)."""
    path = Path(path)
    if not (path / TOKENIZER_FILE).is_file() and (path / "tokenizer" / TOKENIZER_FILE).is_file():
        return path / "tokenizer"
    return path


def read_record(folder: str | Path) -> dict[str, Any]:
    """The parsed tokenizer.json of a tokenizer folder (or of a corpus folder holding one)."""
    folder = tokenizer_folder(folder)
    path = folder / TOKENIZER_FILE
    if not path.is_file():
        raise UserError(f"no tokenizer at {folder}: expected {path} (a DIR/tokenizer folder written by musiclm tokenize)")
    record = read_json(path, ADVICE)
    try:
        record["config"], record["quantizers"], record["backbones"], record["fingerprint"]
    except (KeyError, TypeError) as e:
        raise UserError(f"{path} is not a musiclm tokenizer file (no {e}); re-run musiclm tokenize") from None
    if record.get("format") != FORMAT_VERSION:
        raise UserError(
            f"{path} has tokenizer format {record.get('format')}, this musiclm reads {FORMAT_VERSION}: "
            "re-run musiclm tokenize into a new --out (without --tokenizer) to fit a new tokenizer"
        )
    return record


def error_line(e: BaseException) -> str:
    """The first line of an exception's message (its type's name when it has none), for one-line errors."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _sums_in_record(folder: Path, record: dict[str, Any], own: FileRecord | None = UNRECORDED) -> dict[str, FileRecord | None]:
    """The files tokenizer.json names with their sha256 (quantizers, saved backbones), for a folder without
    records.json. Their sizes were not recorded: each record takes the file's size as it is now, so that
    only its sha256 is checked. ``own``: tokenizer.json's record (it has none: UNRECORDED)."""

    def sums_only(rel: str, sha: str) -> FileRecord:
        path = folder / rel
        return FileRecord(path.stat().st_size if path.is_file() else 0, str(sha))

    out: dict[str, FileRecord | None] = {TOKENIZER_FILE: own}
    for fname, sha in (record.get("quantizers") or {}).items():
        out[fname] = sums_only(fname, sha)
    for entry in (record.get("backbones") or {}).values():
        if isinstance(entry, dict) and entry.get("path"):
            for fname, sha in (entry.get("sha256") or {}).items():
                out[f"{entry['path']}/{fname}"] = sums_only(f"{entry['path']}/{fname}", sha)
    return out


def folder_records(folder: str | Path, record: dict[str, Any] | None) -> dict[str, FileRecord | None]:
    """``{path relative to the folder: record}`` of every file of a tokenizer folder but records.json itself.

    ``record``: its parsed tokenizer.json (None when unreadable). From records.json when there is one; a
    folder written before record files is described by the sums in tokenizer.json. DamagedFile when
    records.json is damaged, UserError when it is missing from a folder whose tokenizer.json says it has one.
    """
    folder = Path(folder)
    try:
        return dict(read_records(folder / RECORDS_FILE))
    except FileNotFoundError:
        if record is not None and record.get("records"):
            raise UserError(f"{folder / RECORDS_FILE} is missing: {ADVICE}") from None
    return _sums_in_record(folder, record or {})


def read_checked_record(folder: str | Path) -> dict[str, Any]:
    """:func:`read_record`, after tokenizer.json is checked against records.json (hashed), so that a damaged
    tokenizer.json is told as such before its content is read."""
    folder = tokenizer_folder(folder)
    try:
        recorded = read_records(folder / RECORDS_FILE).get(TOKENIZER_FILE)
    except FileNotFoundError:
        recorded = None
    if recorded is not None:
        require(folder / TOKENIZER_FILE, recorded, ADVICE, full=True)
    return read_record(folder)


def check_folder(folder: str | Path, full: bool = False) -> dict[str, Any]:
    """The parsed tokenizer.json of a tokenizer folder whose files are all sound, else DamagedFile /
    UserError (one line naming the file).

    tokenizer.json and the quantizer arrays are hashed; the saved backbones are hashed only with ``full``,
    else checked for size and their safetensors header."""
    folder = tokenizer_folder(folder)
    record = read_checked_record(folder)
    small = {TOKENIZER_FILE, *QUANTIZER_FILES.values()}
    for rel, rec in sorted(folder_records(folder, record).items()):
        require(folder / rel, rec, ADVICE, full=full or rel in small)
    return record


def expected_files(folder: str | Path) -> dict[str, tuple[FileRecord | None, str]]:
    """Every file a tokenizer folder should hold, for ``musiclm verify``: ``{relative path: (record, advice)}``.

    When records.json is damaged or missing, it is listed (and so reported) and the files are checked against
    the sums in tokenizer.json; when neither tells what belongs, every file there is checked for being whole."""
    folder = Path(folder)
    try:
        record = json.loads((folder / TOKENIZER_FILE).read_bytes())
        record = record if isinstance(record, dict) else None
    except (OSError, ValueError):
        record = None
    try:
        records = folder_records(folder, record)
        listed = (folder / RECORDS_FILE).exists()
    except UserError:  # records.json damaged or missing: reported as such (and the files are not "unrecorded")
        records, listed = _sums_in_record(folder, record or {}, own=None), True
    if record is None and len(records) <= 1:  # nothing says which files belong: take what is there
        records.update({p.relative_to(folder).as_posix(): None for p in folder.rglob("*") if p.is_file()})
    out = {rel: (rec, ADVICE) for rel, rec in records.items()}
    if listed:
        out[RECORDS_FILE] = (None, ADVICE)
    return out


def load_quantizers(folder: str | Path) -> dict[str, np.ndarray]:
    """The quantizer arrays of a tokenizer folder (:data:`QUANTIZER_FILES`), by name; :class:`DamagedFile`
    for one that does not load. Check the folder first (:func:`check_folder`): this reads, it does not hash."""
    folder = Path(folder)
    quantizers = {}
    for name, fname in QUANTIZER_FILES.items():
        try:
            quantizers[name] = np.load(folder / fname, allow_pickle=False)
        except (OSError, ValueError) as e:
            raise DamagedFile(folder / fname, f"unreadable: {error_line(e)}", ADVICE) from None
    return quantizers
