"""``musiclm verify DIR``: every file of a folder checked against its recorded checksum.

The folder is one of

- a tokenized folder (``tokenizer/`` + ``shards/``): shards, stats, errors, the
  plan and manifest (records: :func:`musiclm.shards.writer.expected_files`) and
  its tokenizer;
- a tokenizer folder (``tokenizer.json``): quantizer arrays and saved backbones
  (:func:`musiclm.pipeline.tokenizer.expected_files`);
- a run folder (``run.json``): checkpoints, run files and its tokenizer copy
  (:func:`musiclm.training.checkpoint.expected_files`);
- a model folder holding ``semantic/``, ``coarse/``, ``fine/`` runs (and maybe ``tokenizer/``).

Each hook returns ``{path relative to its folder: (FileRecord or None, advice)}``;
a None record means the file has no checksum of its own (it must exist and be
whole). Files found but named by no hook are *unexpected*. Every file is hashed,
in parallel threads, with a progress bar on a terminal. The exit code is 0 only
when nothing is damaged, missing or unexpected.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable

from musiclm.errors import UserError
from musiclm.integrity import FileRecord, Finding, check_files

Expected = dict[str, tuple[FileRecord | None, str]]
STAGES = ("semantic", "coarse", "fine")


def _prefixed(prefix: str, files: Expected) -> Expected:
    return {f"{prefix}/{rel}" if prefix else rel: v for rel, v in files.items()}


def _tokenized(folder: Path) -> Expected:
    from musiclm.pipeline.tokenizer import expected_files as tokenizer_files
    from musiclm.shards.writer import expected_files as shard_files

    return {**shard_files(folder), **_prefixed("tokenizer", tokenizer_files(folder / "tokenizer"))}


def _tokenizer(folder: Path) -> Expected:
    from musiclm.pipeline.tokenizer import expected_files

    return expected_files(folder)


def _run(folder: Path) -> Expected:
    from musiclm.training.checkpoint import expected_files

    return expected_files(folder)


def _model(folder: Path) -> Expected:
    out: Expected = {}
    for stage in STAGES:
        if (folder / stage).is_dir():
            out.update(_prefixed(stage, _run(folder / stage)))
    if (folder / "tokenizer").is_dir():
        out.update(_prefixed("tokenizer", _tokenizer(folder / "tokenizer")))
    return out


def folder_kind(folder: Path) -> tuple[str, Callable[[Path], Expected]]:
    """What ``folder`` is, and the hook that lists what it should hold; UserError when it is none of them."""
    if not folder.is_dir():
        raise UserError(f"{folder} is not a folder: pass a tokenized folder, a run folder or a model folder")
    if (folder / "shards").is_dir() and (folder / "tokenizer").is_dir():
        return "tokenized folder", _tokenized
    if (folder / "run.json").is_file():
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
            found.append(Path(dirpath, name).relative_to(folder).as_posix())
    return found


def verify_folder(folder: str | Path, workers: int | None = None, progress: bool = False) -> tuple[str, int, list[Finding]]:
    """(kind, files checked, findings) for ``folder``; no findings means all is well."""
    folder = Path(folder)
    kind, hook = folder_kind(folder)
    expected = hook(folder)
    present = _present(folder)
    if not progress:
        return kind, len(expected), check_files(folder, expected, present, workers=workers)
    from rich.progress import Progress

    with Progress(transient=True) as bar:
        task = bar.add_task(f"verify {folder.name}", total=len(expected))
        findings = check_files(folder, expected, present, workers=workers, progress=lambda n: bar.advance(task, n))
    return kind, len(expected), findings


def run_verify(folder: str | Path, as_json: bool = False, workers: int | None = None) -> bool:
    """``musiclm verify``: print the findings (a table, or JSON); True when all is well."""
    from rich.console import Console

    console = Console()
    kind, checked, findings = verify_folder(folder, workers=workers, progress=not as_json and Console(stderr=True).is_terminal)
    if as_json:
        print(json.dumps({"folder": str(folder), "kind": kind, "files_checked": checked, "ok": not findings, "findings": [f.to_json() for f in findings]}, indent=2))
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
    counts = {s: sum(f.status == s for f in findings) for s in ("damaged", "missing", "unexpected")}
    console.print(", ".join(f"{n} {s}" for s, n in counts.items() if n))
    return False
