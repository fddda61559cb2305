"""How fast are a tokenized folder's checksums checked? ``musiclm verify``, the check at the start of every
``musiclm tokenize``, and what the records add to training start-up.

Builds (or reuses, in ``--dir``) the synthetic corpus of ``bench_driver_scale.py``: ``--clips`` tiny clips in
shards of 256 written by the project's ShardWriter, so every shard has its record. Then, in this process:

- ``verify``: :func:`musiclm.commands.verify.verify_folder` (every file hashed whole) with 1 thread and with
  ``--workers`` threads: files/s and MB/s; next to it sha256 alone over the same bytes on one thread;
- the tokenize start-up check (:func:`musiclm.shards.repair.check_shards`) on the untouched folder (records
  read once, a quick check of every file, no hashing), and on a folder whose files' times all moved (as
  after a copy that does not keep them: every file is hashed once and its record updated);
- training start-up (:func:`musiclm.training.corpus_split.index_shards`) with the records, and with them moved away.

The files were just written (or read), so they come from the page cache: MB/s is the hashing, not the disk.

    python benchmarks/bench_verify.py --dir /tmp/corpus100k                     # 100,000 clips
    python benchmarks/bench_verify.py --dir /tmp/corpus1m --clips 1000000      # the 1M corpus of bench_driver_scale
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_driver_scale import build  # noqa: E402

from musiclm.shards.format import list_shards  # noqa: E402
from musiclm.shards.records import RECORDS_DIR  # noqa: E402
from musiclm.shards.repair import check_shards  # noqa: E402
from musiclm.training.corpus_split import index_shards  # noqa: E402
from musiclm.commands.verify import verify_folder  # noqa: E402


def timed(call):
    t = time.perf_counter()
    result = call()
    return result, time.perf_counter() - t


def sha256_alone(paths: list[Path]) -> None:
    for p in paths:
        h = hashlib.sha256()
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clips", type=int, default=100_000)
    ap.add_argument("--dir", type=Path, required=True, help="corpus folder; built there unless it holds one")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="processes writing the corpus")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="verify threads")
    args = ap.parse_args()

    folder = args.dir
    if not list_shards(folder):
        _, seconds = timed(lambda: build(folder, args.clips, args.jobs))
        print(f"built {args.clips:,} clips in {len(list_shards(folder)):,} shards in {seconds:.0f} s ({args.jobs} processes)")
    files = [p for p in folder.rglob("*") if p.is_file()]
    total = sum(p.stat().st_size for p in files)
    shards = list_shards(folder)
    print(f"corpus {folder}: {len(shards):,} shards, {len(files):,} files, {total / 1e6:,.0f} MB")
    sha256_alone(files)  # warm the page cache

    print(f"\n{'verify':<40}{'wall':>9}{'files/s':>11}{'MB/s':>9}")
    for workers in sorted({1, args.workers}):
        (kind, checked, findings), seconds = timed(lambda w=workers: verify_folder(folder, workers=w))
        assert all(f.path.startswith("tokenizer/") for f in findings), findings[:3]  # the stand-in tokenizer.json has no record
        print(f"{f'verify_folder, {workers} thread(s)':<40}{seconds:>8.2f}s{checked / seconds:>11,.0f}{total / 1e6 / seconds:>9,.0f}")
    _, seconds = timed(lambda: sha256_alone(files))
    print(f"{'sha256 alone, 1 thread':<40}{seconds:>8.2f}s{len(files) / seconds:>11,.0f}{total / 1e6 / seconds:>9,.0f}")

    print(f"\n{'tokenize start-up check (check_shards)':<40}{'wall':>9}")
    state, seconds = timed(lambda: check_shards(folder))
    assert not state.found
    print(f"{'untouched folder':<40}{seconds:>8.2f}s")
    now = time.time_ns()
    for p in files:
        os.utime(p, ns=(now, now))
    state, seconds = timed(lambda: check_shards(folder))
    assert not state.found
    print(f"{'every file time moved (hash all once)':<40}{seconds:>8.2f}s")
    _, seconds = timed(lambda: check_shards(folder))
    print(f"{'the same, next run':<40}{seconds:>8.2f}s")

    print(f"\n{'training start-up (index_shards)':<40}{'wall':>9}")
    _, with_records = timed(lambda: index_shards(shards))
    moved = folder / f"{RECORDS_DIR}.moved"
    (folder / RECORDS_DIR).rename(moved)
    try:
        _, without = timed(lambda: index_shards(shards))
    finally:
        moved.rename(folder / RECORDS_DIR)
    print(f"{'with records (read, sizes checked)':<40}{with_records:>8.2f}s")
    print(f"{'records moved away':<40}{without:>8.2f}s")


if __name__ == "__main__":
    main()
