"""``musiclm verify DIR``: every file of a folder checked against its recorded checksum.

The folder is one of

- a tokenized folder (``tokenizer/`` + ``shards/``): shards, stats, errors, the
  plan and manifest (records: :func:`musiclm.shards.records.expected_files`),
  its tokenizer, and the audit index if one was built
  (:func:`musiclm.audit.index.expected_files`: derived from the shards, so
  checked for being whole, not against checksums);
- a tokenizer folder (``tokenizer.json``): quantizer arrays and saved backbones
  (:func:`musiclm.shards.tokenizer_folder.expected_files`);
- a run folder (``run.json``): checkpoints, run files and its tokenizer copy
  (:func:`musiclm.training.run_folder.expected_files`);
- a model folder holding ``semantic/``, ``coarse/``, ``fine/`` runs (and maybe ``tokenizer/``).

Each hook returns ``{path relative to its folder: (FileRecord or None, advice)}``;
a None record means the file has no checksum of its own (it must exist and be
whole); :data:`~musiclm.integrity.UNRECORDED` means it should have one and has
none (a folder written before records were kept): it is reported as
*unrecorded*. Files found but named by no hook are *unexpected* (a temporary
``.NAME.tmp`` is the leftover of a killed run). Every file is hashed, in
parallel threads (hashlib lets go of the GIL), with a progress bar on a
terminal; each record file is read once. The exit code is 0 only when nothing
is damaged, missing, unrecorded or unexpected.

Layer: commands (imports the base layer and, lazily, the expected-files hooks of shards, training,
hub and audit).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable

from musiclm.config import STAGES
from musiclm.errors import UserError
from musiclm.hub.card import README
from musiclm.hub.model_folder import TOKENIZER
from musiclm.integrity import FileRecord, Finding, check_files

IGNORED = (".musiclm.lock", "audit/.lock")  # the lock files musiclm tokenize and musiclm audit leave

Expected = dict[str, tuple[FileRecord | None, str]]


def _prefixed(prefix: str, files: Expected) -> Expected:
    return {f"{prefix}/{rel}" if prefix else rel: v for rel, v in files.items()}


def _tokenized(folder: Path) -> Expected:
    from musiclm.audit.index import expected_files as audit_files
    from musiclm.shards.records import expected_files as shard_files

    return {**shard_files(folder), **_prefixed("tokenizer", _tokenizer(folder / "tokenizer")), **audit_files(folder)}


def _tokenizer(folder: Path) -> Expected:
    from musiclm.shards.tokenizer_folder import expected_files

    return expected_files(folder)


def _run(folder: Path) -> Expected:
    from musiclm.training.run_folder import expected_files

    return expected_files(folder)


def _model(folder: Path) -> Expected:
    out: Expected = {}
    for stage in STAGES:
        if (folder / stage).is_dir():
            out.update(_prefixed(stage, _run(folder / stage)))
    if (folder / TOKENIZER).is_dir():
        out.update(_prefixed(TOKENIZER, _tokenizer(folder / TOKENIZER)))
    if (folder / README).is_file():  # the model card of a model pulled from the hub
        out[README] = (None, "pull the model again")
    return out


def folder_kind(folder: Path) -> tuple[str, Callable[[Path], Expected]]:
    """What ``folder`` is, and the hook that lists what it should hold; UserError when it is none of them."""
    if not folder.is_dir():
        raise UserError(f"{folder} is not a folder: pass a tokenized folder, a run folder or a model folder")
    if (folder / "shards").is_dir() and (folder / "tokenizer").is_dir():
        return "tokenized folder", _tokenized
    if (folder / "run.json").is_file() or (folder / "checkpoints").is_dir():  # a run whose run.json is lost is still one
        return "run folder", _run
    if (folder / "tokenizer.json").is_file():
        return "tokenizer folder", _tokenizer
    if any((folder / s / "run.json").is_file() for s in STAGES):
        return "model folder", _model
    raise UserError(
        f"{folder} is not a musiclm folder: expected tokenizer/ and shards/ (musiclm tokenize), run.json (musiclm train), "
        "tokenizer.json, or semantic/, coarse/, fine/ runs"
    )


def _present(folder: Path) -> list[str]:
    found = []
    for dirpath, _, names in os.walk(folder):
        for name in names:
            rel = Path(dirpath, name).relative_to(folder).as_posix()
            if rel not in IGNORED and not rel.startswith(".write-test-"):  # tokenize's own lock and write probe
                found.append(rel)
    return found


def _explain(findings: list[Finding]) -> list[Finding]:
    """Unexpected temporaries are the leftovers of a killed run, and damaged-step-N checkpoints were set
    aside by ``train --resume``: say so."""
    out = []
    for f in findings:
        if f.status == "unexpected" and Path(f.path).name.startswith(".") and f.path.endswith(".tmp"):
            f = Finding(f.path, f.status, "a leftover of a killed run", "the next run of the command that writes this folder removes it")
        elif f.status == "unexpected" and any(part.startswith("damaged-step-") for part in Path(f.path).parts):
            f = Finding(f.path, f.status, "a damaged checkpoint musiclm train --resume set aside", "delete it once you no longer need it")
        out.append(f)
    return out


def verify_folder(folder: str | Path, workers: int | None = None, progress: bool = False) -> tuple[str, int, list[Finding]]:
    """(kind, files checked, findings) for ``folder``; no findings means all is well."""
    folder = Path(folder)
    kind, hook = folder_kind(folder)
    expected = hook(folder)
    present = _present(folder)
    if not progress:
        return kind, len(expected), _explain(check_files(folder, expected, present, workers=workers))
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    with Progress(TextColumn("verify {task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(), console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task(folder.name, total=len(expected))
        findings = check_files(folder, expected, present, workers=workers, progress=lambda n: bar.advance(task, n))
    return kind, len(expected), _explain(findings)


def run_verify(folder: str | Path, as_json: bool = False, workers: int | None = None) -> bool:
    """``musiclm verify``: print the findings (a table, or JSON); True when all is well (the command then exits 0, else 1)."""
    from rich.console import Console

    console = Console()
    kind, checked, findings = verify_folder(folder, workers=workers, progress=Console(stderr=True).is_terminal)
    counts = {s: sum(f.status == s for f in findings) for s in ("damaged", "missing", "unrecorded", "unexpected")}
    if as_json:
        body = {"folder": str(folder), "kind": kind, "files_checked": checked, "ok": not findings, "counts": counts, "findings": [f.to_json() for f in findings]}
        print(json.dumps(body, indent=2))
        return not findings
    if not findings:
        console.print(f"{folder}: {kind}, {checked} files checked, all match their records")
        return True
    from rich.table import Table

    table = Table(title=f"{folder}: {kind}, {checked} files checked")
    for col in ("file", "status", "what", "to do"):
        table.add_column(col, overflow="fold")
    for f in findings:
        table.add_row(f.path, f.status, f.detail, f.advice)
    console.print(table)
    console.print(", ".join(f"{n} {s}" for s, n in counts.items() if n))
    return False
