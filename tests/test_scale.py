"""The driver code of a tokenized corpus at scale: training start-up, ``musiclm stats`` and resume read
only what they need, and their memory does not grow with the corpus (the summary's only by each
clip's duration, which its exact median needs).

Two synthetic corpora of tiny clips (10k and 40k clips in shards of 256, written by the project's
ShardWriter) stand in for a large one. Peak memory is measured in a fresh process per call, so one
measurement never sees another's allocations.
"""

from __future__ import annotations

import builtins
import json
import math
import os
import shutil
import subprocess
import sys
import tarfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from unittest import mock

import numpy as np
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest

from musiclm import atomic
from musiclm.commands.stats import summarize
from musiclm.shards import tar as tar_mod
from musiclm.shards.format import (
    TokenInfo,
    TokenSample,
    file_key,
    list_shards,
    sample_key,
)
from musiclm.shards.read import done_files, done_keys, partial_keys
from musiclm.shards.stats import CLIP_SCHEMA, shard_keys
from musiclm.shards.tar import scan_keys
from musiclm.shards.writer import clean_unfinished
from musiclm.training.corpus_split import ShardEntry, index_shards, split_data
from tests.factories import Failed, fake_info_json, fake_shards

ROOT = Path(__file__).resolve().parents[1]
SHARD_SIZE = 256
SEGMENTS = 3  # segments per source file; 256 is no multiple of 3, so files straddle shard boundaries
SEGMENT_SECONDS = 10.0
SMALL, LARGE = 10_000, 40_000


def scale_info_json() -> dict:
    """Four frames per clip, but codebooks of 1024: each shard's code counts have thousands of rows, as a real
    corpus's do, so holding every shard's counts at once would show."""
    return fake_info_json(sem_k=1024, ac_k=1024, q=2, coarse=1, clap_levels=2, clap_k=1024, sem_rate=4, ac_rate=4, emb_dim=2)


def write_scale_corpus(folder: Path, clips: int, first: int = 0, shard_size: int = SHARD_SIZE) -> list[TokenSample]:
    """A tokenized corpus folder of tiny clips ``first .. first + clips - 1`` (random codes; clip ``i`` is segment
    ``i % SEGMENTS`` of file ``i // SEGMENTS``, a file's last segment is shorter), written by ShardWriter as
    ``musiclm tokenize`` writes one, from shard ``first // shard_size`` on; returns the clips in write order.
    About 0.4 ms a clip, nearly all of it in Python's tarfile. Writers of disjoint ranges may run at once."""
    info_json = scale_info_json()
    info = TokenInfo.from_json(info_json)
    rng = np.random.default_rng(first)
    codes = rng.integers(0, 1024, (clips, 4)).astype(np.uint16)  # [clips, T] semantic, acoustic and CLAP codes alike
    last = np.round(rng.uniform(1.0, SEGMENT_SECONDS, clips), 3)  # [clips] duration if the clip ends its file
    emb = np.zeros((1, info.clap_embed_dim), np.float16)
    samples = []
    for j, i in enumerate(range(first, first + clips)):
        n, seg = divmod(i, SEGMENTS)
        name = f"album{n // 100}/track{n}.flac"
        meta = {
            "source": name,
            "segment": seg,
            "segments": SEGMENTS,
            "start": seg * SEGMENT_SECONDS,
            "duration": float(last[j]) if seg == SEGMENTS - 1 else SEGMENT_SECONDS,
            "sample_rate": 44100,
            "channels": 2,
        }
        c = codes[j]
        samples.append(TokenSample(sample_key(name, seg), c, np.stack([c, c[::-1]]), c.reshape(2, 2), emb, meta))
    with mock.patch.object(atomic, "fsync", lambda path: None):  # durability is not under test; fsync is most of the time
        fake_shards(folder, samples, info_json=info_json, shard_size=shard_size, start_index=first // shard_size)
    return samples


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("small")
    write_scale_corpus(folder, SMALL)
    return folder


@pytest.fixture(scope="module")
def large(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("large")
    write_scale_corpus(folder, LARGE)
    return folder


def header_scan_entries(shards: list[Path]) -> list[ShardEntry]:
    """What index_shards gave before it read stats/: a tar header scan of every shard."""
    entries = [ShardEntry(str(p), len(scan_keys(p))) for p in shards]
    return [e for e in entries if e.count > 0]


@pytest.fixture
def no_tar_reads(monkeypatch):
    """Any attempt to open a tar (the header scan, the reader, the tarfile module) fails the test."""
    real_open = builtins.open

    def guarded_open(file, *args, **kwargs):
        if str(file).endswith(".tar"):
            raise AssertionError(f"opened {file}")
        return real_open(file, *args, **kwargs)

    def refuse(*args, **kwargs):
        raise AssertionError("read a tar")

    monkeypatch.setattr(builtins, "open", guarded_open)
    monkeypatch.setattr(tarfile, "open", refuse)
    monkeypatch.setattr(tar_mod, "scan_keys", refuse)
    monkeypatch.setattr(tar_mod, "iter_tar_samples", refuse)


# ---- training start-up --------------------------------------------------------------------------------------------


def test_index_shards_counts_clips_from_stats_without_opening_a_tar(small, request):
    shards = list_shards(small)
    expected = header_scan_entries(shards)
    assert sum(e.count for e in expected) == SMALL
    request.getfixturevalue("no_tar_reads")
    assert index_shards(shards) == expected


def test_the_stats_rows_of_a_shard_are_its_tar_clips_in_order(small):
    for shard in list_shards(small):
        assert shard_keys(shard) == scan_keys(shard)


@pytest.mark.slow
def test_stats_keys_are_the_tar_keys_of_a_real_tokenized_corpus(tokenized):
    """The same on the output of ``musiclm tokenize`` (segments, failures, a last short shard)."""
    out, _ = tokenized
    shards = list_shards(out)
    assert len(shards) > 1
    for shard in shards:
        assert shard_keys(shard) == scan_keys(shard)
    assert index_shards(shards) == header_scan_entries(shards)


def test_a_shard_without_stats_is_counted_by_a_header_scan(small, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(small, copy)
    shards = list_shards(copy)
    (copy / "stats" / f"{shards[1].stem}.parquet").unlink()
    assert index_shards(shards) == header_scan_entries(shards)


def test_start_up_reads_one_footer_per_shard_and_no_rows(small, monkeypatch, no_tar_reads):
    footers: list[str] = []
    real_read_metadata = pq.read_metadata

    def counting_read_metadata(where, *args, **kwargs):
        footers.append(str(where))
        return real_read_metadata(where, *args, **kwargs)

    def refuse(*args, **kwargs):
        raise AssertionError("read rows")

    monkeypatch.setattr(pq, "read_metadata", counting_read_metadata)
    monkeypatch.setattr(pq, "read_table", refuse)
    shards = list_shards(small)
    index_shards(shards)
    assert footers == [str(small / "stats" / f"{p.stem}.parquet") for p in shards]


def single_shard_corpus(folder: Path, clips: int = 200) -> Path:
    write_scale_corpus(folder, clips, shard_size=clips)
    assert len(list_shards(folder)) == 1
    return folder


def test_a_single_shard_split_reads_its_keys_from_the_key_column(tmp_path, monkeypatch):
    folder = single_shard_corpus(tmp_path / "one")
    info = TokenInfo.load(folder)
    without_stats = tmp_path / "without_stats"
    shutil.copytree(folder, without_stats, ignore=shutil.ignore_patterns("stats"))
    by_scan = split_data(without_stats, info, None, val_fraction=0.2)

    reads: list[tuple[list[str], int]] = []
    real_read_table = pq.read_table

    def counting_read_table(source, *args, **kwargs):
        table = real_read_table(source, *args, **kwargs)
        reads.append((kwargs.get("columns"), table.num_rows))
        return table

    monkeypatch.setattr(pq, "read_table", counting_read_table)
    monkeypatch.setattr(tar_mod, "scan_keys", lambda path: pytest.fail(f"scanned {path}"))
    by_stats = split_data(folder, info, None, val_fraction=0.2)
    assert reads == [(["key"], 200)]  # one column of the one shard's rows, nothing else
    (train,), (val,) = by_stats.train, by_stats.val
    (scan_train,), (scan_val,) = by_scan.train, by_scan.val
    assert (train.count, train.exclude, val.exclude) == (scan_train.count, scan_train.exclude, scan_val.exclude)
    assert by_stats.how == by_scan.how


# ---- musiclm stats --------------------------------------------------------------------------------------------------


def test_summary_equals_the_whole_table_computation_bit_for_bit(small):
    """summarize reduces the clip table file by file; what it reports is what reducing the whole table gives."""
    summary = summarize(small)
    stats = small / "stats"
    table = pads.dataset(sorted(str(p) for p in stats.glob("shard-*.parquet")), schema=CLIP_SCHEMA, format="parquet").to_table()
    durations = table["duration"].to_numpy()
    hist, edges = np.histogram(durations, bins=20)
    assert summary["totals"]["clips"] == table.num_rows == SMALL
    assert summary["totals"]["files"] == pc.count_distinct(table["source"]).as_py() == math.ceil(SMALL / SEGMENTS)
    assert summary["totals"]["shards"] == pc.count_distinct(table["shard"]).as_py()
    assert summary["totals"]["hours"] == float(durations.sum() / 3600.0)
    d = summary["durations"]
    assert (d["min"], d["mean"], d["median"], d["max"]) == (durations.min(), durations.mean(), np.median(durations), durations.max())
    assert d["histogram"] == {"edges": edges.tolist(), "counts": hist.tolist()}
    for stream, s in summary["streams"].items():
        assert s["clip_unique_mean"] == pc.mean(table[f"{stream}_unique"]).as_py()
        assert s["clip_entropy_bits_mean"] == pc.mean(table[f"{stream}_entropy_bits"]).as_py()
    codes = pq.read_table(stats / "_codes").group_by(["stream", "level", "code"]).aggregate([("count", "sum")])
    for stream, s in summary["streams"].items():
        rows = codes.filter(pc.equal(codes["stream"], stream))
        assert [lv["tokens"] for lv in s["levels"]] == [
            pc.sum(rows.filter(pc.equal(rows["level"], lv))["count_sum"]).as_py() for lv in range(len(s["levels"]))
        ]


MEASURE = """
import json, sys, tracemalloc
from pathlib import Path
import pyarrow as pa

folder, what = Path(sys.argv[1]), sys.argv[2]
if what == "index":
    from musiclm.shards.format import list_shards
    from musiclm.training.corpus_split import index_shards
    shards = list_shards(folder)
    call = lambda: index_shards(shards)
elif what == "codes":
    from musiclm.shards.stats import unigram_entropy
    call = lambda: unigram_entropy(folder, "acoustic", [0, 1])
else:
    from musiclm.commands.stats import summarize
    call = lambda: summarize(folder)
pool = pa.default_memory_pool()
before = pool.bytes_allocated()
tracemalloc.start()
result = call()
current, peak = tracemalloc.get_traced_memory()
print(json.dumps({"python": peak - current, "arrow": pool.max_memory() - before}))
"""


def peak_bytes(folder: Path, what: str) -> int:
    """Working memory of one call in a fresh process (``index``: index_shards; ``codes``: unigram_entropy, which
    sums the code counts; ``summary``: summarize): the peak of Python's allocations (tracemalloc, numpy's
    included) beyond what the call returns (index_shards returns one entry per shard), plus Arrow's pool."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", MEASURE, str(folder), what], capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr
    peaks = json.loads(proc.stdout)
    return peaks["python"] + peaks["arrow"]


@pytest.fixture(scope="module")
def peaks(small, large) -> dict[tuple[str, int], int]:
    """(what, clips) -> peak_bytes, measured two processes at a time."""
    folders = {SMALL: small, LARGE: large}
    runs = [(what, clips) for what in ("index", "codes", "summary") for clips in folders]
    with ThreadPoolExecutor(2) as pool:
        return dict(zip(runs, pool.map(lambda run: peak_bytes(folders[run[1]], run[0]), runs)))


@pytest.mark.parametrize("what", ["index", "codes"])
def test_start_up_and_code_counts_take_the_same_memory_for_4x_the_clips(peaks, what):
    """Holding every shard's code counts at once (as the stats did before) puts the 40k peak at 4x the 10k one."""
    small_peak, large_peak = peaks[what, SMALL], peaks[what, LARGE]
    assert large_peak < 1.5 * small_peak, f"{what}: {small_peak / 1e6:.2f} MB for {SMALL} clips, {large_peak / 1e6:.2f} MB for {LARGE}"


def test_summary_memory_grows_only_by_what_exact_duration_statistics_need(peaks):
    """The summary keeps each clip's duration (8 bytes; the median and numpy's float sums need them all to
    stay exact) and each file's 10-byte key (distinct files), and transients of these: well under 64 bytes
    per clip. Holding the clip table and every shard's code counts (as before) grew by ~900 bytes per clip here."""
    small_peak, large_peak = peaks["summary", SMALL], peaks["summary", LARGE]
    per_clip = (large_peak - small_peak) / (LARGE - SMALL)
    assert per_clip < 64, f"{small_peak / 1e6:.2f} MB for {SMALL} clips, {large_peak / 1e6:.2f} MB for {LARGE}: {per_clip:.0f} bytes per clip"


# ---- resume -----------------------------------------------------------------------------------------------------------


def test_partial_keys_are_the_settled_keys_of_partly_finished_files(tmp_path, monkeypatch):
    """A run killed before shard 2's tar was renamed, after its errors file (one failed segment, one failed
    file) was: only the files partly settled send their settled keys to the decode stage."""
    out = tmp_path / "out"
    samples = write_scale_corpus(out, 5 * SHARD_SIZE)
    lost = samples[2 * SHARD_SIZE : 3 * SHARD_SIZE]
    failed = next(s for s in lost if s.meta["segment"] == 1)
    gone = "album9/gone.flac"
    fake_shards(out, [Failed(file_key(gone), gone, "decode", "unreadable"), Failed(failed.key, failed.meta["source"], "tokenize", "too short")], shard_size=SHARD_SIZE, start_index=2)
    (out / "shards" / "shard-000002.tar").unlink()
    assert clean_unfinished(out) == 2  # shard 2's stats and code counts

    in_stats: dict[str, set[str]] = {}  # source -> its keys in finished shards
    for s in samples[: 2 * SHARD_SIZE] + samples[3 * SHARD_SIZE :]:
        in_stats.setdefault(s.meta["source"], set()).add(s.key)
    partly = {src for src, keys in in_stats.items() if len(keys) < SEGMENTS} | {failed.meta["source"]}
    expected = {failed.key}.union(*(in_stats.get(src, set()) for src in partly))

    columns: list[list[str] | None] = []
    real_read_table = pq.read_table

    def recording_read_table(source, *args, **kwargs):
        columns.append(kwargs.get("columns"))
        return real_read_table(source, *args, **kwargs)

    done = done_files(out)
    monkeypatch.setattr(pq, "read_table", recording_read_table)
    got = partial_keys(out, done)
    assert got == expected
    source_of = {s.key: s.meta["source"] for s in samples} | {file_key(gone): gone}
    assert got == {k for k in done_keys(out) if source_of[k] not in done}
    assert 0 < len(got) < 10 and len(done_keys(out)) > 1000
    assert columns and all(c == ["key", "source"] for c in columns)
