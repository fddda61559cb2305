"""Parquet statistics of a tokenized corpus: per-shard stats files, and the corpus reductions read from them.

Each finished shard ``N`` has two small Parquet files, written by
:func:`write_shard_stats` just before its tar is renamed:

- ``stats/shard-N.parquet``: one row per clip (:data:`CLIP_SCHEMA`);
- ``stats/_codes/shard-N.parquet``: how often each code occurs in the shard,
  one row per nonzero ``(stream, level, code)`` (:data:`CODES_SCHEMA`).

``stats/`` is a Parquet dataset folder: pyarrow, pandas, duckdb and polars read
it as one clip table and skip ``_codes/`` (and ``.tmp`` leftovers) because
their names start with ``_`` (``.``). Every file carries the same explicit
schema, so a shard of one clip reads like any other.

:func:`read_corpus_stats` answers "what do the tokens look like" from these files only
(plus ``errors/`` and ``tokenizer.json``), never from the shards, and reduces
them one file at a time, so it stays fast for a corpus of a million clips and
its memory grows only by each clip's duration (8 bytes) and each file's key
(10 bytes). The training loader reads clip counts and keys of a shard from here
(:func:`shard_clip_count`, :func:`shard_keys`) instead of scanning its tar.

Every file read here is checked first against the record its shard keeps
(:mod:`musiclm.shards.records`, :func:`~musiclm.shards.read.check_read`): these
files are small and read whole anyway, so by their sha256. A damaged, missing or unreadable one is a one-line
:class:`~musiclm.integrity.DamagedFile` saying how to repair it, never a pyarrow
traceback. The summary a user sees (tables, plot) is the ``musiclm stats`` command's:
:mod:`musiclm.commands.stats`.

Layer: shards (imports the base layer and :mod:`musiclm.shards.format` / ``records`` / ``read``).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from musiclm import atomic
from musiclm.errors import UserError
from musiclm.integrity import DamagedFile
from musiclm.shards.format import TokenInfo, TokenSample, file_key
from musiclm.shards.read import ARROW_ERRORS, check_read, read_parquet
from musiclm.shards.records import recorded_files, repair_advice

STREAMS = ("semantic", "acoustic", "clap")
CODES_DIR = "_codes"
TOP_CODES = 5

CLIP_SCHEMA = pa.schema(
    [
        pa.field("key", pa.string(), nullable=False),  # read by resume (read.done_keys, partial_keys) and shard_keys
        ("shard", pa.string()),
        ("source", pa.string()),  # path relative to the corpus root
        ("segment", pa.int32()),
        ("segments", pa.int32()),  # segments the source file was split into
        ("start", pa.float64()),  # seconds into the source file
        ("duration", pa.float64()),  # seconds
        ("sample_rate", pa.int32()),  # of the source file
        ("channels", pa.int32()),
        ("semantic_frames", pa.int32()),
        ("acoustic_frames", pa.int32()),
        ("clap_windows", pa.int32()),
    ]
    + [
        field
        for s in STREAMS
        for field in (
            (f"{s}_unique", pa.float64()),  # distinct codes in the clip, mean over levels
            (f"{s}_entropy_bits", pa.float64()),  # entropy of the clip's codes, mean over levels
        )
    ]
)

CODES_SCHEMA = pa.schema(
    [
        pa.field("stream", pa.string(), nullable=False),
        pa.field("level", pa.int32(), nullable=False),
        pa.field("code", pa.int32(), nullable=False),
        pa.field("count", pa.int64(), nullable=False),
    ]
)


# ---------------------------------------------------------------------------------------------
# writing


def _levels_major(sample: TokenSample, stream: str) -> np.ndarray:
    """The codes of one stream as [levels, T]: semantic [1, T_s], acoustic [Q, T_a], clap [L, W]."""
    if stream == "semantic":
        return sample.semantic.reshape(1, -1)
    if stream == "acoustic":
        return sample.acoustic
    return sample.clap.T


def _entropy_bits(counts: np.ndarray) -> float:
    """Entropy in bits of the distribution given by nonnegative ``counts`` (0 when empty)."""
    total = counts.sum()
    if total == 0:
        return 0.0
    p = counts[counts > 0] / total
    return float(-(p * np.log2(p)).sum())


def _clip_row(sample: TokenSample, shard: str) -> dict[str, Any]:
    meta = sample.meta
    row: dict[str, Any] = {
        "key": sample.key,
        "shard": shard,
        "source": meta.get("source"),
        "segment": meta.get("segment"),
        "segments": meta.get("segments"),
        "start": meta.get("start"),
        "duration": meta.get("duration"),
        "sample_rate": meta.get("sample_rate"),
        "channels": meta.get("channels"),
        "semantic_frames": int(sample.semantic.shape[-1]),
        "acoustic_frames": int(sample.acoustic.shape[-1]),
        "clap_windows": int(sample.clap.shape[0]),
    }
    for stream in STREAMS:
        codes = _levels_major(sample, stream)  # [levels, T]
        per_level = [np.bincount(level.astype(np.int64)) for level in codes]
        row[f"{stream}_unique"] = float(np.mean([np.count_nonzero(c) for c in per_level])) if per_level else 0.0
        row[f"{stream}_entropy_bits"] = float(np.mean([_entropy_bits(c) for c in per_level])) if per_level else 0.0
    return row


def _code_counts(samples: list[TokenSample], stream: str, levels: int) -> pa.Table:
    """Nonzero per-code counts of one stream over ``samples``, as rows of :data:`CODES_SCHEMA`."""
    parts = [_levels_major(s, stream) for s in samples]
    codes = np.concatenate(parts, axis=1).astype(np.int64) if parts else np.zeros((levels, 0), np.int64)  # [levels, sum T]
    n_levels = codes.shape[0]
    k = int(codes.max()) + 1 if codes.size else 1
    # one bincount for all levels: level l's code c lands in bin l * k + c
    counts = np.bincount((codes + np.arange(n_levels)[:, None] * k).ravel(), minlength=n_levels * k)
    nonzero = np.flatnonzero(counts)
    return pa.table(
        {
            "stream": pa.array([stream] * len(nonzero), pa.string()),
            "level": pa.array(nonzero // k, pa.int32()),
            "code": pa.array(nonzero % k, pa.int32()),
            "count": pa.array(counts[nonzero], pa.int64()),
        },
        schema=CODES_SCHEMA,
    )


def write_shard_stats(stats_dir: Path, name: str, samples: list[TokenSample], info: TokenInfo) -> None:
    """Write ``stats_dir/NAME.parquet`` (one row per sample) and ``stats_dir/_codes/NAME.parquet``.

    ``name`` is the shard's name (``shard-000003``). Both files are written
    atomically; the code counts first, so a clip file always has its counts.
    """
    stats_dir = Path(stats_dir)
    (stats_dir / CODES_DIR).mkdir(parents=True, exist_ok=True)
    codes = pa.concat_tables([_code_counts(samples, s, info.stream(s).levels) for s in STREAMS])
    atomic.write_parquet(codes, stats_dir / CODES_DIR / f"{name}.parquet")
    clips = pa.Table.from_pylist([_clip_row(s, name) for s in samples], schema=CLIP_SCHEMA)
    atomic.write_parquet(clips, stats_dir / f"{name}.parquet")


# ---------------------------------------------------------------------------------------------
# reading


MEAN_COLUMNS = tuple(f"{s}_{m}" for s in STREAMS for m in ("unique", "entropy_bits"))


@dataclass
class ClipTotals:
    """The clip table reduced file by file (:func:`_reduce_clips`): what the summary reports, without the table."""

    clips: int
    files: int  # distinct sources
    shards: int  # distinct shard names
    durations: np.ndarray  # [clips with a duration] float64 seconds in file order, kept whole for the exact median
    means: dict[str, float | None]  # MEAN_COLUMNS -> mean over the clips; None without clips


@dataclass
class ErrorTotals:
    """The errors files reduced file by file (:func:`_reduce_errors`)."""

    files: int  # distinct sources that failed, wholly or in part
    by_step: dict[str, int]  # step -> rows, in order of first appearance


@dataclass
class CorpusStats:
    """Everything the corpus summary and its plot need (:mod:`musiclm.commands.stats`), read from the Parquet files of one corpus."""

    data_dir: Path
    info: TokenInfo
    clips: ClipTotals
    counts: dict[str, np.ndarray]  # stream -> [levels, codebook_size] int64 code counts over the corpus
    errors: ErrorTotals


def _parquet_files(folder: Path, finished: set[str] | None = None) -> list[str]:
    """Parquet files of ``folder``; with ``finished``, only those of shards in it (a run killed and
    never resumed can leave stats of a shard whose tar was never renamed)."""
    if not folder.is_dir():
        return []
    return sorted(str(p) for p in folder.glob("shard-*.parquet") if finished is None or p.stem in finished)


def _finished_shards(data_dir: Path) -> set[str]:
    return {p.stem for p in (Path(data_dir) / "shards").glob("shard-*.tar")}


def _batches(files: list[str], columns: list[str], schema: pa.Schema | None = None, out: Path | None = None) -> Iterator[pa.RecordBatch]:
    """``columns`` of the rows of ``files``, one file at a time, as record batches in file order.

    Reducing file by file keeps memory flat however many files a corpus has (a
    dataset scanner over all of them reads ahead without bound when the
    consumer is slower); the batches are the chunks that reading the files as
    one table would give.
    """
    for path in files:
        yield from read_parquet(path, out or Path(path).parent, columns=columns, schema=schema).to_batches()


def clip_stats_file(shard: str | Path) -> Path:
    """``DIR/stats/shard-N.parquet``, the clip rows of the shard ``DIR/shards/shard-N.tar``."""
    shard = Path(shard)
    return shard.parent.parent / "stats" / f"{shard.stem}.parquet"


def shard_clip_count(shard: str | Path) -> int | None:
    """Clips of a finished shard from its stats file's footer (no row is read); None when it has no stats file."""
    path = clip_stats_file(shard)
    if not path.is_file():
        return None
    try:
        return pq.read_metadata(path).num_rows
    except ARROW_ERRORS as e:
        raise DamagedFile(path, f"unreadable Parquet footer: {str(e).splitlines()[0][:200]}", repair_advice(path.parent.parent)) from None


def shard_keys(shard: str | Path) -> list[str] | None:
    """Clip keys of a finished shard in tar order, from its stats file; None when it has none.

    :class:`~musiclm.shards.writer.ShardWriter` writes the tar members and the
    stats rows from one list of samples, so the orders agree.
    """
    path = clip_stats_file(shard)
    return read_parquet(path, path.parent.parent, columns=["key"]).column("key").to_pylist() if path.is_file() else None


def _check_corpus(data_dir: Path) -> TokenInfo:
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise UserError(f"{data_dir} does not exist: pass the --out folder of musiclm tokenize")
    if not (data_dir / "stats").is_dir() or not (data_dir / "tokenizer" / "tokenizer.json").is_file():
        raise UserError(
            f"{data_dir} is not a tokenized corpus (expected stats/ and tokenizer/tokenizer.json): "
            "pass the --out folder of musiclm tokenize, or run musiclm tokenize first"
        )
    return TokenInfo.load(data_dir)


def _checked_files(data_dir: Path, folder: Path, finished: set[str] | None, kind: str) -> list[str]:
    """:func:`_parquet_files`, each checked whole against its record; with ``finished``, every one of
    those shards must have its file. :class:`~musiclm.integrity.DamagedFile` otherwise."""
    files = _parquet_files(folder, finished)
    if finished:
        missing = sorted(finished - {Path(f).stem for f in files})
        if missing:
            raise UserError(f"{folder / missing[0]}.parquet is missing (a finished shard without its {kind}): {repair_advice(data_dir)}")
    records = recorded_files(data_dir, (kind,))
    if kind == "errors":  # an errors file stands on its own: a recorded one must be there
        lost = sorted(rel for rel in records if not (data_dir / rel).is_file())
        if lost:
            raise UserError(f"{data_dir / lost[0]} is missing: {repair_advice(data_dir)}")
    for f in files:
        check_read(f, data_dir, records, full=True)
    return files


def _stream_counts(data_dir: Path, info: TokenInfo, shards: Sequence[str] | None = None) -> dict[str, np.ndarray]:
    """stream -> [levels, K] code counts summed over the finished shards (or the named ones);
    K = codebook size, or more if a code exceeds it. Reads one file of code counts at a time."""
    names = _finished_shards(data_dir) if shards is None else _finished_shards(data_dir) & set(shards)
    files = _checked_files(Path(data_dir), Path(data_dir) / "stats" / CODES_DIR, names, "codes")
    out = {s: np.zeros((info.stream(s).levels, info.stream(s).codebook_size), np.int64) for s in STREAMS}
    for batch in _batches(files, ["stream", "level", "code", "count"], CODES_SCHEMA, Path(data_dir)):
        for stream in STREAMS:
            rows = batch.filter(pc.equal(batch.column("stream"), stream))
            if not rows.num_rows:
                continue
            level = rows.column("level").to_numpy().astype(np.int64)
            code = rows.column("code").to_numpy().astype(np.int64)
            total = out[stream]
            grow = (max(0, int(level.max()) + 1 - total.shape[0]), max(0, int(code.max()) + 1 - total.shape[1]))
            if any(grow):
                total = out[stream] = np.pad(total, ((0, grow[0]), (0, grow[1])))
            np.add.at(total, (level, code), rows.column("count").to_numpy())
    return out


def _reduce_clips(files: list[str], out: Path | None = None) -> ClipTotals:
    """Totals of the clip rows of ``files``, read one file at a time.

    Sources are told apart by their 10-byte file key (the key prefix resume
    uses), not their paths, so a corpus of many files holds 10 bytes per file.
    Means add per-batch sums in file order, as Arrow's mean over the whole
    column does, so they are the same to the last bit.
    """
    clips, shards = 0, set()
    sources: list[np.ndarray] = []  # [distinct sources of a batch] file keys as void10
    durations: list[np.ndarray] = []
    sums, counts = dict.fromkeys(MEAN_COLUMNS, 0.0), dict.fromkeys(MEAN_COLUMNS, 0)
    for batch in _batches(files, ["source", "shard", "duration", *MEAN_COLUMNS], CLIP_SCHEMA, out):
        clips += batch.num_rows
        shards.update(pc.unique(batch.column("shard")).drop_null().to_pylist())
        keys = "".join(file_key(s) for s in pc.unique(batch.column("source")).drop_null().to_pylist())
        sources.append(np.frombuffer(bytes.fromhex(keys), dtype="V10"))
        d = batch.column("duration").to_numpy(zero_copy_only=False).astype(np.float64)
        durations.append(d[~np.isnan(d)])
        for col in MEAN_COLUMNS:
            sums[col] += pc.sum(batch.column(col)).as_py() or 0.0
            counts[col] += pc.count(batch.column(col)).as_py()
    return ClipTotals(
        clips=clips,
        files=len(np.unique(np.concatenate(sources))) if sources else 0,
        shards=len(shards),
        durations=np.concatenate(durations) if durations else np.zeros(0),
        means={col: sums[col] / counts[col] if counts[col] else None for col in MEAN_COLUMNS},
    )


def _reduce_errors(files: list[str], out: Path | None = None) -> ErrorTotals:
    """Failed sources and rows per step over the errors files, read one file at a time."""
    sources: set[str] = set()
    by_step: dict[str, int] = {}
    for batch in _batches(files, ["source", "step"], None, out):
        sources.update(pc.unique(batch.column("source")).drop_null().to_pylist())
        for s in batch.column("step").value_counts():
            step = s["values"].as_py()
            by_step[step] = by_step.get(step, 0) + int(s["counts"].as_py())
    return ErrorTotals(len(sources), by_step)


def read_corpus_stats(data_dir: Path) -> CorpusStats:
    """Read the Parquet statistics of a tokenized corpus folder; :class:`UserError` if it is not one."""
    data_dir = Path(data_dir)
    info = _check_corpus(data_dir)
    clips = _reduce_clips(_checked_files(data_dir, data_dir / "stats", _finished_shards(data_dir), "stats"), data_dir)
    errors = _reduce_errors(_checked_files(data_dir, data_dir / "errors", None, "errors"), data_dir)
    return CorpusStats(data_dir, info, clips, _stream_counts(data_dir, info), errors)


def level_summary(counts: np.ndarray, codebook_size: int) -> dict[str, Any]:
    """Usage of one codebook from its [K] code counts over the corpus: codebook_size, tokens, codes_used,
    utilisation_pct, entropy_nats, entropy_bits, perplexity (None without tokens) and the top codes."""
    total = int(counts.sum())
    used = int(np.count_nonzero(counts))
    out: dict[str, Any] = {
        "codebook_size": codebook_size,
        "tokens": total,
        "codes_used": used,
        "utilisation_pct": 100.0 * used / codebook_size,
        "entropy_nats": None,
        "entropy_bits": None,
        "perplexity": None,
        "top": [],
    }
    if total == 0:
        return out
    p = counts[counts > 0] / total
    nats = float(-(p * np.log(p)).sum())
    out.update(entropy_nats=nats, entropy_bits=nats / math.log(2), perplexity=math.exp(nats))
    order = np.argsort(-counts, kind="stable")[: min(TOP_CODES, used)]
    out["top"] = [{"code": int(c), "count": int(counts[c]), "share": float(counts[c] / total)} for c in order]
    return out


def unigram_entropy(data_dir: Path, stream: str, levels: Sequence[int], shards: Sequence[str] | None = None) -> float:
    """Mean over ``levels`` of the entropy (nats) of each level's code distribution in the corpus,
    or in the named ``shards`` only (e.g. "shard-000003").

    This is the cross-entropy of a model that predicts each code from its
    level's frequency alone: the loss a trained stage must beat. Computed on
    the held-out shards, it is the best any context-free model can do there.
    """
    if stream not in STREAMS:
        raise UserError(f"unknown token stream {stream!r}: expected one of {', '.join(STREAMS)}")
    data_dir = Path(data_dir)
    info = _check_corpus(data_dir)
    counts = _stream_counts(data_dir, info, shards)[stream]  # [levels, K]
    if not levels:
        raise UserError("unigram_entropy needs at least one level")
    out = []
    for lv in levels:
        if not 0 <= lv < len(counts) or counts[lv].sum() == 0:
            raise UserError(f"{data_dir} has no {stream} tokens at level {lv}: re-run musiclm tokenize on this folder")
        out.append(level_summary(counts[lv], info.stream(stream).codebook_size)["entropy_nats"])
    return float(np.mean(out))
