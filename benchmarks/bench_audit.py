"""The audit index at scale: its size on disk and how fast it answers a query, at 10k and 1M clips.

Synthetic tokens, no backbone and no Ray: clips of ``--seconds`` (30 s) with semantic codes at 50 Hz from
a vocabulary of 1024 (runs of 1-4 frames, codes drawn with probability ~ 1 / (rank + 20)) and CLAP window
embeddings of 512 dimensions (10 s windows, 5 s hop: 5 per clip), in shards of 256 clips, one source file
per clip. For each size:

- **build**: the per-shard index files, written from the clips in memory by ``--jobs`` processes (making
  the synthetic tokens is timed apart and not counted). Sizes up to ``--tar-limit`` are also written as
  real shard tars (the project's ShardWriter, acoustic codes included, so reads cost what they cost) and
  indexed from those by ``open_index``, as ``musiclm audit`` does; then opened again (reused).
- **size**: bytes of ``DIR/audit``, and per clip.
- **query**: :func:`musiclm.audit.search.search` for ``--queries`` copied queries (10 s excerpts of random
  clips at 4 phases: 10% of tokens changed in the phase that lines up, 30% in the other three; the clip's
  CLAP window plus noise, cosine about 0.95) and as many novel ones (random tokens and embeddings): the
  first query (it maps every index file) apart, then the median and 90th percentile, and how many copies
  came back first with the right source and an offset within 0.5 s. ``search`` reads the stored tokens of
  the clips it verifies: from the tars where they were written (counted), else made again in memory (not
  counted: that time is subtracted). The backbones that turn a generated file into a query are not part of
  this (MERT at 4 phases and CLAP: on this CPU about 0.4 s per second of audio at small size).
- **calibration** (token route, ``--calibrate``): the 64 excerpts, each searched twice.

    python benchmarks/bench_audit.py                        # 10,000 and 1,000,000 clips
    python benchmarks/bench_audit.py --clips 10000 --calibrate
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from musiclm.audit.index import INDEX_DIR, INDEX_FILE, INDEX_FORMAT, load_index, open_index
from musiclm.audit.shard_files import IndexParams, clap_projection, shard_arrays, write_shard
from musiclm.audit.search import Query, search
from musiclm.shards.format import TokenInfo, TokenSample, sample_key, shard_name

SHARD = 256
RATE = 50
VOCAB = 1024
DIM = 512
WINDOW, HOP = 10.0, 5.0
QUERY_SECONDS = 10.0


def info_json() -> dict:
    return {
        "format": 2,
        "fingerprint": "bench-audit",
        "streams": {
            "semantic": {"levels": 1, "codebook_size": VOCAB, "frame_rate": RATE, "sample_rate": 24000},
            "acoustic": {"levels": 8, "codebook_size": 1024, "frame_rate": 75, "sample_rate": 24000, "coarse_levels": 3},
            "clap": {"levels": 12, "codebook_size": 1024, "window_seconds": WINDOW, "hop_seconds": HOP, "embed_dim": DIM, "frame_rate": None},
        },
    }


def shard_samples(shard: int, clips: int, seconds: float, acoustic: bool = False) -> list[TokenSample]:
    """The synthetic clips of one shard (the same every time for the same arguments)."""
    rng = np.random.default_rng([7, shard])
    noise = np.random.default_rng([8, shard])  # acoustic codes apart, so that the other arrays do not depend on them
    t = int(seconds * RATE)
    p = 1.0 / (np.arange(VOCAB) + 20.0)
    p /= p.sum()
    w = max(1, int((seconds - WINDOW) // HOP) + 1)
    out = []
    for i in range(clips):
        codes = rng.choice(VOCAB, size=t, p=p)
        semantic = np.repeat(codes, rng.integers(1, 5, t))[:t].astype(np.uint16)
        emb = rng.standard_normal((w, DIM)).astype(np.float32)
        emb /= np.linalg.norm(emb, axis=1, keepdims=True)
        ac = noise.integers(0, 1024, (8, int(seconds * 75)), dtype=np.uint16) if acoustic else np.zeros((8, 1), np.uint16)
        source = f"song-{shard:06d}-{i:03d}.flac"
        meta = {"source": source, "segment": 0, "segments": 1, "start": 0.0, "duration": seconds, "sample_rate": 44100, "channels": 2}
        out.append(TokenSample(sample_key(source, 0), semantic, ac, np.zeros((w, 12), np.uint16), emb.astype(np.float16), meta))
    return out


def _index_shards(args: tuple) -> tuple[float, float, dict]:
    """Worker: make shards [a, b) and write their index files; (seconds making tokens, seconds indexing, entries)."""
    folder, a, b, clips, seconds, params = args
    folder = Path(folder)
    proj = np.load(folder / "clap_projection.npy")
    make = index = 0.0
    entries = {}
    for s in range(a, b):
        n = min(SHARD, clips - s * SHARD)
        t0 = time.perf_counter()
        samples = shard_samples(s, n, seconds)
        t1 = time.perf_counter()
        entries[shard_name(s)] = write_shard(folder, shard_name(s), shard_arrays(samples, params, proj))
        make += t1 - t0
        index += time.perf_counter() - t1
    return make, index, entries


def build_from_memory(data: Path, clips: int, seconds: float, jobs: int) -> tuple[float, float, float]:
    """Index files for ``clips`` synthetic clips, written without tars: (wall s, making the tokens included;
    seconds of the workers spent indexing; seconds spent making the tokens)."""
    params = IndexParams()
    folder = data / INDEX_DIR
    folder.mkdir(parents=True, exist_ok=True)
    np.save(folder / "clap_projection.npy", clap_projection(DIM, params))
    shards = (clips + SHARD - 1) // SHARD
    step = max(1, shards // (jobs * 8))
    tasks = [(str(folder), a, min(shards, a + step), clips, seconds, params) for a in range(0, shards, step)]
    record = {"format": INDEX_FORMAT, "params": asdict(params), "tokenizer": "bench-audit", "shards": {}}
    t0 = time.perf_counter()
    make = index = 0.0
    with ProcessPoolExecutor(jobs) as pool:
        for m, i, entries in pool.map(_index_shards, tasks):
            make, index = make + m, index + i
            record["shards"].update(entries)
    wall = time.perf_counter() - t0
    (folder / INDEX_FILE).write_text(json.dumps(record))
    return wall, index, make


def write_tars(data: Path, clips: int, seconds: float) -> None:
    from musiclm.shards.writer import ShardWriter

    writer = ShardWriter(data, TokenInfo.from_json(info_json()), SHARD, 0)
    for s in range((clips + SHARD - 1) // SHARD):
        for sample in shard_samples(s, min(SHARD, clips - s * SHARD), seconds, acoustic=True):
            writer.add(sample)
    writer.close()


def queries(index, n: int, seconds: float, rng: np.random.Generator):
    """(kind, query, truth): copies of random clips and novel queries (module docstring)."""
    t = int(QUERY_SECONDS * RATE)
    for _ in range(n):
        gid = int(rng.integers(index.clips))
        s, pos = (int(x) for x in index.locate(gid))
        clip = shard_samples(s, min(SHARD, index.clips - s * SHARD), seconds)[pos]
        a = int(rng.integers(0, len(clip.semantic) - t))
        rows = []
        for k in range(4):
            row = clip.semantic[a : a + t].astype(np.int64)
            flip = rng.random(t) < (0.1 if k == 0 else 0.3)
            row[flip] = rng.integers(0, VOCAB, int(flip.sum()))
            rows.append(row)
        w = min(len(clip.clap_emb) - 1, round(a / RATE / HOP))
        emb = clip.clap_emb[w : w + 1].astype(np.float32) + 0.33 * rng.standard_normal((1, DIM)).astype(np.float32) / np.sqrt(DIM)
        yield "copy", Query(np.stack(rows), np.array([0.0, 0.005, 0.01, 0.015]), emb, QUERY_SECONDS), (clip.meta["source"], a / RATE)
    for _ in range(n):
        emb = rng.standard_normal((1, DIM)).astype(np.float32)
        yield "novel", Query(rng.integers(0, VOCAB, (4, t)), np.array([0.0, 0.005, 0.01, 0.015]), emb, QUERY_SECONDS), None


def run_queries(index, n: int, seconds: float, from_tars: bool) -> dict:
    reading = [0.0]
    if not from_tars:
        cache: dict[int, list[TokenSample]] = {}

        def read_clips(gids):  # the clips made again in memory; this time is taken off the query's
            t0 = time.perf_counter()
            out = {}
            for g in gids:
                s, pos = (int(x) for x in index.locate(int(g)))
                if s not in cache:
                    cache[s] = shard_samples(s, min(SHARD, index.clips - s * SHARD), seconds)
                out[int(g)] = cache[s][pos]
            reading[0] += time.perf_counter() - t0
            return out

        index.read_clips = read_clips
    rng = np.random.default_rng(1)
    times: dict[str, list[float]] = {"copy": [], "novel": []}
    cpu: dict[str, list[float]] = {"copy": [], "novel": []}
    first, right = None, 0
    for kind, q, truth in queries(index, n, seconds, rng):
        reading[0] = 0.0
        t0, c0 = time.perf_counter(), time.process_time()
        found = search(index, q)
        took = time.perf_counter() - t0 - reading[0]
        if first is None:
            first = took
            continue
        times[kind].append(took)
        cpu[kind].append(time.process_time() - c0 - reading[0])  # CPU time: what a busy shared machine does not inflate
        if truth is not None and found and found[0].source == truth[0] and abs(found[0].offset - truth[1]) <= 0.5:
            right += 1
    return {
        "first_s": first,
        **{f"{k}_median_s": float(np.median(v)) for k, v in times.items()},
        **{f"{k}_p90_s": float(np.quantile(v, 0.9)) for k, v in times.items()},
        **{f"{k}_cpu_median_s": float(np.median(v)) for k, v in cpu.items()},
        "copies_right": f"{right}/{len(times['copy'])}",
    }


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def bench(clips: int, args, root: Path) -> dict:
    data = root / f"corpus-{clips}"
    reuse = args.reuse and (data / INDEX_DIR / INDEX_FILE).is_file()
    if not reuse:
        shutil.rmtree(data, ignore_errors=True)
        (data / "tokenizer").mkdir(parents=True)
        (data / "tokenizer" / "tokenizer.json").write_text(json.dumps(info_json()))
    info = TokenInfo.from_json(info_json())
    row: dict = {"clips": clips, "shards": (clips + SHARD - 1) // SHARD, "seconds_per_clip": args.seconds}
    if clips <= args.tar_limit and not reuse:
        t0 = time.perf_counter()
        write_tars(data, clips, args.seconds)
        row["tars_gb"] = sum(p.stat().st_size for p in (data / "shards").iterdir()) / 1e9
        print(f"  wrote {row['shards']} shard tars ({row['tars_gb']:.2f} GB) in {time.perf_counter() - t0:.0f} s", flush=True)
        t0 = time.perf_counter()
        index = open_index(data)
        row["build_from_tars_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        index = open_index(data)
        row["reopen_s"] = time.perf_counter() - t0
        row["from_tars"] = run_queries(index, args.queries, args.seconds, from_tars=True)
        if args.calibrate:
            from musiclm.audit.calibration import calibrate

            t0 = time.perf_counter()
            cal = calibrate(index)
            row["calibration_s"] = time.perf_counter() - t0
            row["calibration"] = {s: {k: cal[s][k] for k in ("threshold", "recall", "novel_max", "copied_p10")} for s in ("semantic", "clap")}
        shutil.rmtree(data / INDEX_DIR)
    if not reuse:
        row["build_wall_s"], row["build_index_s"], row["build_make_tokens_s"] = build_from_memory(data, clips, args.seconds, args.jobs)
    folder = data / INDEX_DIR
    record = json.loads((folder / INDEX_FILE).read_text())
    t0 = time.perf_counter()
    index = load_index(data, info, record, np.load(folder / "clap_projection.npy"), {})
    row["load_s"] = time.perf_counter() - t0
    row["index_bytes"] = index.bytes_on_disk()
    row["bytes_per_clip"] = row["index_bytes"] / clips
    row["entries"] = index.entries
    row["in_memory"] = run_queries(index, args.queries, args.seconds, from_tars=False)
    row["peak_rss_mb"] = peak_rss_mb()
    if not args.keep:
        shutil.rmtree(data, ignore_errors=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clips", type=int, nargs="+", default=[10_000, 1_000_000])
    ap.add_argument("--seconds", type=float, default=30.0, help="seconds per clip")
    ap.add_argument("--queries", type=int, default=20, help="copied and as many novel queries")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--tar-limit", type=int, default=20_000, help="sizes up to this also go through real shard tars")
    ap.add_argument("--calibrate", action="store_true", help="time the calibration (token route) where tars are written")
    ap.add_argument("--dir", type=Path, default=None, help="work folder (default: a temporary one)")
    ap.add_argument("--keep", action="store_true", help="keep the corpora and indexes")
    ap.add_argument("--reuse", action="store_true", help="with --dir: query an index kept by --keep instead of building it")
    args = ap.parse_args()
    root = args.dir or Path(tempfile.mkdtemp(prefix="bench-audit-"))
    root.mkdir(parents=True, exist_ok=True)
    try:
        for clips in args.clips:
            print(f"{clips:,} clips of {args.seconds:g} s:", flush=True)
            row = bench(clips, args, root)
            print(json.dumps(row, indent=1), flush=True)
            q = row["in_memory"]
            built = "" if "build_wall_s" not in row else (
                f"indexing took {row['build_index_s']:.0f} s of worker time ({row['build_wall_s']:.0f} s wall with {args.jobs} workers, making the tokens included); "
            )
            print(
                f"  index {row['index_bytes'] / 1e9:.2f} GB ({row['bytes_per_clip']:.0f} B per clip, {row['entries']:,} n-gram entries), {built}"
                f"query: first {q['first_s']:.2f} s, then median {q['copy_median_s']:.3f} s (copies) / {q['novel_median_s']:.3f} s (novel), "
                f"p90 {max(q['copy_p90_s'], q['novel_p90_s']):.3f} s; CPU median {q['copy_cpu_median_s']:.3f} / {q['novel_cpu_median_s']:.3f} s; "
                f"copies right {q['copies_right']}; peak RSS {row['peak_rss_mb']:.0f} MB",
                flush=True,
            )
    finally:
        if args.dir is None and not args.keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
