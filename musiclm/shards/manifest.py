"""The corpus manifest: which files ``musiclm tokenize`` read, so that a model can say what it learnt from.

``musiclm tokenize CORPUS --out DIR`` writes, beside the shards::

    DIR/manifest.json      the summary: counts, licence files, the command, the manifest hash
    DIR/manifest.parquet   one row per audio file: path, bytes, sha256, seconds, error, header_seconds

The table is Parquet so that a corpus of a million files stays a few tens of
MB and reads in a second; the summary is small enough to travel with every run
folder trained on ``DIR`` (:func:`carry_manifest`) and with a pushed model.

**Paths.** ``paths="names"`` keeps each file's path relative to the corpus root;
``paths="hashed"`` keeps the sha256 (hex) of that path instead, and leaves out
the corpus folder and any path on the recorded command line. A hashed manifest
still proves which files were used to whoever holds them, without naming them
to anyone else. (The shards themselves still name their source files.)

**Seconds** are what decodes. ``header_seconds`` is set only for a file whose
header promised more than that and that was tokenized all the same, because its
stream ends whole (an Ogg file whose last granule position is overstated; see
:mod:`musiclm.pipeline.audio`); a table written before the column existed reads
with it empty.

**Content hashes** come from the job's probe pass (Ray tasks over every new
file, see :mod:`musiclm.pipeline.tokenize_job`), which keeps them in
``DIR/plan.parquet`` with the durations, so a resumed run hashes only the files
added since. Files the plan does not cover (a folder tokenized by an older
musiclm) are hashed here, by threads, with a progress line.

**Licence files** are found by name anywhere in the corpus tree (``LICENSE*``,
``LICENCE*``, ``COPYING*``, ``COPYRIGHT*``, ``NOTICE*``, ``*.license``,
``*.licence``; case does not matter), each with its size, sha256 and first
non-empty line. Their contents are not interpreted.

**The manifest hash** (``manifest_sha256``) is the sha256 of one JSON line per
audio file, then one per licence file, each ``[path, bytes, sha256]``, sorted by
path, after a first line naming the path mode. It covers what the corpus *is*,
not when, where or how it was read: the same files give the same hash on any
machine, in any order, with any musiclm version. :func:`check_manifest`
recomputes it from the table.

Layer: shards (imports the base layer and :mod:`musiclm.shards.records` / :mod:`musiclm.shards.read`).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
from collections import Counter
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, NamedTuple

from musiclm import atomic
from musiclm.digest import file_digest
from musiclm.errors import UserError

MANIFEST_FILE = "manifest.json"
TABLE_FILE = "manifest.parquet"
FORMAT = 1
PATH_MODES = ("names", "hashed")
LICENCE_PREFIXES = ("LICENSE", "LICENCE", "COPYING", "COPYRIGHT", "NOTICE")
LICENCE_SUFFIXES = (".license", ".licence")
FIRST_LINE_CHARS = 200


class FileFacts(NamedTuple):
    """What is known of one audio file (None where it is not known)."""

    bytes: int | None
    sha256: str | None
    seconds: float | None
    error: str = ""  # why the probe refused the file; empty when it could be tokenized
    header_seconds: float | None = None  # what the header promised, when more than the ``seconds`` that decode


# ---- small pieces ------------------------------------------------------------------------------------------------------


def check_paths_mode(paths: str) -> str:
    """``paths`` itself when it is "names" or "hashed", else a one-line UserError."""
    if paths not in PATH_MODES:
        raise UserError(f"--manifest-paths must be 'names' or 'hashed', got '{paths}'")
    return paths


def path_key(rel: str, paths: str) -> str:
    """How the manifest names the file ``rel`` (POSIX, relative to the corpus root): itself, or its sha256."""
    return rel if paths == "names" else hashlib.sha256(rel.encode("utf-8")).hexdigest()


def is_licence_file(name: str) -> bool:
    upper = name.upper()
    return upper.startswith(LICENCE_PREFIXES) or name.lower().endswith(LICENCE_SUFFIXES)


def _first_line(path: Path) -> str:
    with open(path, "rb") as f:
        head = f.read(8192).decode("utf-8", errors="replace")
    for line in head.splitlines():
        if line.strip():
            return line.strip()[:FIRST_LINE_CHARS]
    return ""


def find_licences(corpus: str | Path) -> list[dict[str, Any]]:
    """Licence files anywhere under ``corpus`` (see the module docstring), sorted by path:
    ``{"path": relative POSIX path, "bytes", "sha256", "first_line"}``. Hidden files and folders are skipped,
    as the audio listing skips them."""
    corpus = Path(corpus)
    found: list[dict[str, Any]] = []
    seen: set[tuple[int, int]] = set()
    for dirpath, dirnames, filenames in os.walk(corpus, followlinks=True):
        st = os.stat(dirpath)
        if (st.st_dev, st.st_ino) in seen:  # a symlink cycle
            dirnames[:] = []
            continue
        seen.add((st.st_dev, st.st_ino))
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in filenames:
            path = Path(dirpath) / name
            if name.startswith(".") or not is_licence_file(name) or not path.is_file():
                continue
            try:
                size, sha = file_digest(path)
                first = _first_line(path)
            except OSError:
                continue  # unreadable: nothing to record
            found.append({"path": path.relative_to(corpus).as_posix(), "bytes": size, "sha256": sha, "first_line": first})
    return sorted(found, key=lambda r: r["path"])


def command_line(argv: list[str] | None = None) -> list[str]:
    """The command as the user typed it: ``musiclm ...`` for the console script and ``python -m musiclm``."""
    argv = list(sys.argv if argv is None else argv)
    if argv and (Path(argv[0]).name in ("musiclm", "__main__.py")):
        argv[0] = "musiclm"
    return argv


def _redact(argv: list[str], hidden: Iterable[str]) -> list[str]:
    """``argv`` with every argument that names an existing path (or one of ``hidden``) replaced by "<path>"."""
    hidden = {str(h) for h in hidden}

    def private(value: str) -> bool:
        return value in hidden or os.sep in value or (bool(value) and os.path.exists(value))

    out = []
    for i, a in enumerate(argv):
        if i == 0:
            out.append(a)
        elif a.startswith("--") and "=" in a:
            k, v = a.split("=", 1)
            out.append(f"{k}=<path>" if private(v) else a)
        else:
            out.append("<path>" if not a.startswith("-") and private(a) else a)
    return out


def manifest_hash(paths: str, files: Iterable[tuple[str, int | None, str | None]], licences: Iterable[tuple[str, int | None, str | None]]) -> str:
    """sha256 over the canonical content (see the module docstring); rows are ``(path, bytes, sha256)``."""
    h = hashlib.sha256()
    h.update(json.dumps(["musiclm-manifest", FORMAT, paths]).encode() + b"\n")
    for rows in (files, licences):
        for row in sorted(rows, key=lambda r: r[0]):
            h.update(json.dumps(list(row), ensure_ascii=False).encode("utf-8") + b"\n")
    return h.hexdigest()


# ---- writing -----------------------------------------------------------------------------------------------------------


def _fill_digests(corpus: Path, facts: dict[str, FileFacts], console) -> dict[str, FileFacts]:
    """Hash, in threads, the files of ``facts`` whose digest is unknown and that still exist."""
    todo = [rel for rel, f in facts.items() if f.sha256 is None and (corpus / rel).is_file()]
    if not todo:
        return facts

    def digest(rel: str) -> tuple[str, tuple[int, str] | None]:
        try:
            return rel, file_digest(corpus / rel)
        except OSError:
            return rel, None

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    facts = dict(facts)
    threads = min(16, 2 * (os.cpu_count() or 1))  # reading dominates; hashlib releases the GIL
    with Progress(TextColumn("hashing the corpus for its manifest"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(), console=console, transient=True) as bar:
        task = bar.add_task("hash", total=len(todo))
        with ThreadPoolExecutor(threads) as pool:
            for rel, got in pool.map(digest, todo):
                if got is not None:
                    facts[rel] = facts[rel]._replace(bytes=got[0], sha256=got[1])
                bar.advance(task)
    return facts


def _schema():
    import pyarrow as pa

    return pa.schema([("path", pa.string()), ("bytes", pa.int64()), ("sha256", pa.string()), ("seconds", pa.float64()), ("error", pa.string()), ("header_seconds", pa.float64())])


def write_manifest(
    out: str | Path,
    corpus: str | Path,
    facts: dict[str, FileFacts],
    *,
    paths: str = "names",
    command: list[str] | None = None,
    console=None,
) -> dict[str, Any]:
    """Write ``out/manifest.parquet`` and ``out/manifest.json`` for the audio files ``facts`` (relative POSIX
    path → :class:`FileFacts`) of ``corpus``; digests missing from ``facts`` are computed here. Returns the summary.

    ``command`` (default: this process's command line) is recorded with its paths hidden when ``paths`` is
    "hashed". Both files are replaced atomically, the table first: the summary always describes a whole table.
    When ``out`` already holds a manifest that says the same of the corpus (a rerun), it is kept as it is, with
    the time and command of the run that wrote it, and returned: a model trained in between still carries it.
    """
    import pyarrow as pa

    check_paths_mode(paths)
    out, corpus = Path(out), Path(corpus)
    if console is None:
        from rich.console import Console

        console = Console(stderr=True)
    facts = _fill_digests(corpus, facts, console)
    rels = sorted(facts)
    keys = [path_key(r, paths) for r in rels]
    if paths == "hashed":  # a reason may quote the file's path
        root = str(corpus.resolve())
        facts = {r: f._replace(error=f.error.replace(f"{root}/{r}", "<path>").replace(r, "<path>").replace(root, "<path>")) for r, f in facts.items()}
    order = sorted(range(len(rels)), key=lambda i: keys[i])  # hashed keys are sorted by hash, not by name
    rows = {
        "path": [keys[i] for i in order],
        "bytes": [facts[rels[i]].bytes for i in order],
        "sha256": [facts[rels[i]].sha256 for i in order],
        "seconds": [facts[rels[i]].seconds for i in order],
        "error": [facts[rels[i]].error for i in order],
        "header_seconds": [facts[rels[i]].header_seconds for i in order],
    }
    licences = [{**lic, "path": path_key(lic["path"], paths)} for lic in find_licences(corpus)]
    licences.sort(key=lambda r: r["path"])
    digest = manifest_hash(
        paths,
        zip(rows["path"], rows["bytes"], rows["sha256"]),
        ((lic["path"], lic["bytes"], lic["sha256"]) for lic in licences),
    )
    good = [f for f in facts.values() if not f.error]
    argv = command_line() if command is None else list(command)
    summary = {
        "format": FORMAT,
        "musiclm_version": _version(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": argv if paths == "names" else _redact(argv, [corpus, corpus.resolve(), out, out.resolve()]),
        "corpus": str(corpus.resolve()) if paths == "names" else None,
        "paths": paths,
        "files": len(facts),
        "failed": len(facts) - len(good),
        "bytes": sum(f.bytes or 0 for f in facts.values()),
        "seconds": round(sum(f.seconds or 0.0 for f in good), 3),
        "header_overstated": sum(f.header_seconds is not None for f in good),  # tokenized with fewer seconds than their header promised
        "unhashed": sum(f.sha256 is None for f in facts.values()),  # files gone from the corpus before they were hashed
        "formats": dict(sorted(Counter(Path(r).suffix.lower() for r in rels).items())),
        "licences": licences,
        "table": TABLE_FILE,
        "manifest_sha256": digest,
    }
    kept = _unchanged(out, summary, rows)
    if kept is not None:  # a rerun over the same corpus: its manifest stays as the first run wrote it
        return kept
    atomic.write_parquet(pa.Table.from_pydict(rows, schema=_schema()), out / TABLE_FILE)
    atomic.write_text(out / MANIFEST_FILE, json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
    return summary


RUN_FACTS = ("created", "command")  # what a manifest says of the run that wrote it, not of the corpus


def _unchanged(out: Path, summary: dict[str, Any], rows: dict[str, list]) -> dict[str, Any] | None:
    """The manifest already in ``out`` when it says what ``summary`` and ``rows`` say, :data:`RUN_FACTS`
    aside; else None (none there, unreadable, or another corpus)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        old = json.loads((out / MANIFEST_FILE).read_text())
        table = pq.read_table(out / TABLE_FILE)
    except (OSError, ValueError, pa.ArrowException):
        return None
    corpus = {k: v for k, v in summary.items() if k not in RUN_FACTS}
    if not isinstance(old, dict) or {k: v for k, v in old.items() if k not in RUN_FACTS} != corpus:
        return None
    return old if table.to_pydict() == rows else None


def _version() -> str:
    from musiclm.version import __version__

    return __version__


# ---- reading -----------------------------------------------------------------------------------------------------------


def read_manifest(folder: str | Path) -> dict[str, Any] | None:
    """The manifest summary of a tokenized folder or a run folder (``folder/manifest.json``); None when there is none."""
    from musiclm.shards.records import MANIFEST_RECORD, require_recorded

    path = Path(folder) / MANIFEST_FILE
    if not path.is_file():
        return None
    require_recorded(folder, MANIFEST_RECORD, MANIFEST_FILE)  # a tokenized folder keeps a record of it
    try:
        summary = json.loads(path.read_text())
        summary["manifest_sha256"], summary["files"], summary["paths"]
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(f"{path} is not a musiclm corpus manifest ({e}); rerun musiclm tokenize on the corpus") from None
    return summary


def read_file_table(folder: str | Path):
    """The per-file table (a pyarrow Table) of a tokenized folder, with every column of today's
    manifests (one written before a column existed has it empty)."""
    import pyarrow as pa

    from musiclm.shards.read import read_parquet
    from musiclm.shards.records import MANIFEST_RECORD, require_recorded

    path = Path(folder) / TABLE_FILE
    if not path.is_file():
        raise UserError(f"no manifest table at {path}: rerun musiclm tokenize on the corpus to write it")
    require_recorded(folder, MANIFEST_RECORD, TABLE_FILE)
    table = read_parquet(path, folder)
    for column in _schema():
        if column.name not in table.column_names:
            table = table.append_column(column, pa.nulls(table.num_rows, column.type))
    return table


def check_manifest(folder: str | Path) -> str:
    """Recompute the manifest hash of ``folder`` from its table and licences; returns it, or raises UserError
    when it differs from the summary's (the table or the summary was changed after they were written)."""
    summary = read_manifest(folder)
    if summary is None:
        raise UserError(f"no corpus manifest in {folder}: rerun musiclm tokenize on the corpus")
    t = read_file_table(folder)
    got = manifest_hash(
        summary["paths"],
        zip(*(t.column(c).to_pylist() for c in ("path", "bytes", "sha256"))),
        ((lic["path"], lic["bytes"], lic["sha256"]) for lic in summary["licences"]),
    )
    if got != summary["manifest_sha256"]:
        raise UserError(f"the manifest of {folder} does not match its table (hash {got[:12]}, recorded {summary['manifest_sha256'][:12]}): rerun musiclm tokenize")
    return got


def carry_manifest(data_dir: str | Path, run_dir: str | Path) -> None:
    """Copy the manifest summary of the tokenized folder ``data_dir`` into the run folder ``run_dir``.

    A run folder then says what it was trained on after the data folder is gone, and a pushed model carries
    it. Without a manifest in ``data_dir`` (tokenized by an older musiclm) a stale copy in ``run_dir`` is
    removed rather than left to describe other data.
    """
    from musiclm.shards.records import MANIFEST_RECORD, require_recorded

    src, dst = Path(data_dir) / MANIFEST_FILE, Path(run_dir) / MANIFEST_FILE
    if not src.is_file():
        dst.unlink(missing_ok=True)
        return
    require_recorded(data_dir, MANIFEST_RECORD, MANIFEST_FILE)
    tmp = atomic.temp_path(dst)
    shutil.copyfile(src, tmp)
    atomic.fsync_replace(tmp, dst)
