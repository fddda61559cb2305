"""The batch plan: which files of the corpus go through the backbones together, kept in ``plan.parquet``.

Layer: pipeline (imports the base layer, shards and pipeline.audio).

::

    list files → probe each (Ray Data tasks: duration, size, sha256) → whole files, in listing
    order, into numbered batches of at most ``tokenize.batch_seconds`` of audio → plan.parquet

Tokens are a function of the audio and of this plan: each planned batch goes through the
backbones whole, and batches reach the writer in plan order, so tokens and shard membership do
not depend on scheduling, on the number of actors or on timing. Files planned by an earlier run
keep their batches, so a resumed run runs the same batches. A file that cannot be tokenized
(undecodable, too short) is planned in batch -1 with its reason.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from musiclm import atomic
from musiclm.config import TokenizeConfig
from musiclm.digest import file_digest
from musiclm.integrity import DamagedFile
from musiclm.pipeline.audio import AudioError, probe
from musiclm.shards.read import read_parquet
from musiclm.shards.records import PLAN_RECORD, record_folder_files, repair_advice


PLAN_FILE = "plan.parquet"


def plan_batches(files: list[tuple[str, float]], batch_seconds: float, first: int = 0) -> list[tuple[int, list[tuple[str, float]]]]:
    """Whole files ``(rel, seconds)``, in order, into numbered batches of at most ``batch_seconds``
    of audio; a longer file is a batch of its own. Numbers start at ``first``."""
    batches: list[tuple[int, list[tuple[str, float]]]] = []
    current: list[tuple[str, float]] = []
    total = 0.0
    for rel, seconds in files:
        if current and total + seconds > batch_seconds:
            batches.append((first + len(batches), current))
            current, total = [], 0.0
        current.append((rel, seconds))
        total += seconds
    if current:
        batches.append((first + len(batches), current))
    return batches


def plan_corpus(ray, files: list[str], corpus: Path, out: Path, tcfg: TokenizeConfig, pinned: dict[str, int] | None = None) -> dict[str, tuple[float, str, int]]:
    """{rel: (seconds, error, batch)} for every file of ``files``; batch -1 for a file that cannot
    be tokenized. Files planned by an earlier run keep their batches (``out/plan.parquet``), so a
    resumed run runs the same batches; new files are probed (Ray tasks) and planned after them.
    ``pinned``: {rel: batch} for files of a lost plan whose batches the shard records still name."""
    import pyarrow as pa

    path = out / PLAN_FILE
    planned = read_plan(out)
    new = [f for f in files if f not in planned]
    if new:
        ds = ray.data.from_items([{"rel": r} for r in new], override_num_blocks=max(1, min(len(new) // 64, 512)))
        probed = ds.map_batches(_probe_rows, fn_kwargs=dict(corpus=str(corpus), min_seconds=tcfg.audio.min_seconds), batch_size=64, num_cpus=1, batch_format="numpy")
        found = {row["rel"]: (row["seconds"], row["error"], row["bytes"], row["sha256"], None if np.isnan(row["header_seconds"]) else float(row["header_seconds"])) for row in probed.iter_rows()}
        kept = {r: b for r, b in (pinned or {}).items() if r in found and not found[r][1]}
        for rel, number in kept.items():
            planned[rel] = (found[rel][0], "", number, *found[rel][2:])
        first = max([v[2] for v in planned.values()] + [-1]) + 1
        good = [(r, found[r][0]) for r in new if not found[r][1] and r not in kept]
        for number, members in plan_batches(good, tcfg.batch_seconds, first):
            for rel, seconds in members:
                planned[rel] = (seconds, "", number, *found[rel][2:])
        for r in new:
            if found[r][1]:
                planned[r] = (found[r][0], found[r][1], -1, *found[r][2:])
        names = ("seconds", "error", "batch", "bytes", "sha256", "header_seconds")
        rows = {"rel": list(planned), **{n: [v[i] for v in planned.values()] for i, n in enumerate(names)}}
        atomic.write_parquet(pa.Table.from_pydict(rows, schema=_plan_schema()), path)
        record_folder_files(out, PLAN_RECORD, [PLAN_FILE])
    return {f: planned[f][:3] for f in files}


def read_plan(out: Path) -> dict[str, tuple[float, str, int, int | None, str | None, float | None]]:
    """{rel: (seconds, error, batch, bytes, sha256, header_seconds)} of ``out/plan.parquet``; digests are None in
    a plan written before plans kept them, header_seconds in one written before it was kept (or where the header
    agrees with what decodes); a file pyarrow cannot read is a one-line DamagedFile."""
    path = out / PLAN_FILE
    if not path.is_file():
        return {}
    t = read_parquet(path, out)
    if not {"rel", "seconds", "error", "batch"} <= set(t.column_names):
        raise DamagedFile(path, f"not a plan (columns {', '.join(t.column_names)})", repair_advice(out))
    cols = [t.column(c).to_pylist() if c in t.column_names else [None] * t.num_rows for c in ("rel", "seconds", "error", "batch", "bytes", "sha256", "header_seconds")]
    return {r[0]: tuple(r[1:]) for r in zip(*cols)}


def _plan_schema():
    import pyarrow as pa

    return pa.schema([("rel", pa.string()), ("seconds", pa.float64()), ("error", pa.string()), ("batch", pa.int64()), ("bytes", pa.int64()), ("sha256", pa.string()),
                      ("header_seconds", pa.float64())])


def _probe_rows(batch: dict[str, np.ndarray], *, corpus: str, min_seconds: float) -> dict[str, list]:
    """Probe a block of files: their duration, or why they cannot be tokenized; and their size and sha256
    for the corpus manifest (None when the file cannot be read), and the seconds a header promised when more
    than decode (None when it agrees)."""
    out: dict[str, list] = {"rel": [], "seconds": [], "error": [], "bytes": [], "sha256": [], "header_seconds": []}
    with quiet_stderr():
        for rel in batch["rel"]:
            rel = str(rel)
            seconds, error, header = 0.0, "", None
            try:
                info = probe(Path(corpus) / rel)
                seconds = info.duration
                header = info.header_frames / info.sample_rate if info.header_frames else None
                if seconds < min_seconds:
                    error = f"too short: {seconds:.2f} s (minimum {min_seconds:g} s)"
            except Exception as e:  # noqa: BLE001 - recorded in errors/, never fatal for the run
                error = failure_reason(e)
            try:
                size, sha = file_digest(Path(corpus) / rel)
            except OSError:
                size, sha = None, None
            out["rel"].append(rel)
            out["seconds"].append(float(seconds))
            out["error"].append(error)
            out["bytes"].append(size)
            out["sha256"].append(sha)
            out["header_seconds"].append(float("nan") if header is None else header)  # NaN: every block has one type
    return out


def failure_reason(e: Exception) -> str:
    """The errors/ line of a failure: an AudioError's own reason, else the exception."""
    return e.reason if isinstance(e, AudioError) else f"{type(e).__name__}: {e}"


@contextmanager
def quiet_stderr() -> Iterator[None]:
    """Silence C libraries (libmpg123 prints notes about broken MP3s) while probing on the driver."""
    import sys

    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(devnull)
        os.close(saved)
