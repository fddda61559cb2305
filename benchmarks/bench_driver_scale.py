"""Does the driver code stay small at a million clips? Training start-up, ``musiclm stats`` and resume.

Builds a synthetic tokenized corpus of ``--clips`` tiny clips (four codes each, so tar members are a few
bytes and the shards are mostly tar headers) in shards of 256, written by the project's ShardWriter in
``--jobs`` processes (fsync off: writing is not what is measured), then measures each call in a fresh
process (wall time, and peak RSS above the process's RSS after its imports):

- training start-up, ``index_shards``: the old tar header scan (``scan_keys`` on every shard) against the
  clip counts read from the stats footers;
- ``musiclm stats``: the summary (``summarize``) and the code-count sum alone (``unigram_entropy``) on the
  first quarter of the shards and on all of them;
- resume: what the decode stage is sent, ``done_keys`` (every settled key) against ``partial_keys`` (the
  settled keys of files only partly done; here the last file, cut short), pickled, and the time to
  compute it (``done_files``, which the driver calls anyway, is not counted).

The corpus is kept in ``--dir`` and reused when it is there (1M clips: about 10 GB, mostly tar headers).

    python benchmarks/bench_driver_scale.py --dir /tmp/corpus1m                    # 1,000,000 clips
    python benchmarks/bench_driver_scale.py --dir /tmp/corpus100k --clips 100000
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # for tests.test_scale when run as a script

from musiclm.shards.format import list_shards
from tests.test_scale import SHARD_SIZE, write_scale_corpus

CHILD = """
import json, pickle, resource, sys, time
from pathlib import Path

def rss() -> int:
    return int(open("/proc/self/statm").read().split()[1]) * 4096

folder, what = Path(sys.argv[1]), sys.argv[2]
from musiclm.shards.format import list_shards
from musiclm.commands.stats import summarize
from musiclm.shards.read import done_files, done_keys, partial_keys
from musiclm.shards.stats import unigram_entropy
from musiclm.shards.tar import scan_keys
from musiclm.training.corpus_split import ShardEntry, index_shards
shards = list_shards(folder)
done = done_files(folder) if what == "partial_keys" else None  # the driver has it already (it skips those files)
calls = {
    "index_old": lambda: [ShardEntry(str(p), len(scan_keys(p))) for p in shards],
    "index_new": lambda: index_shards(shards),
    "summary": lambda: summarize(folder),
    "codes": lambda: unigram_entropy(folder, "acoustic", [0, 1]),
    "done_keys": lambda: done_keys(folder),
    "partial_keys": lambda: partial_keys(folder, done),
}
before = rss()
t = time.perf_counter()
result = calls[what]()
seconds = time.perf_counter() - t
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
out = {"seconds": seconds, "rss": before, "peak": peak}
if what in ("index_old", "index_new"):
    out["clips"] = sum(e.count for e in result)
if what in ("done_keys", "partial_keys"):
    out["keys"], out["pickled"] = len(result), len(pickle.dumps(result))
print(json.dumps(out))
"""


def measure(folder: Path, what: str) -> dict:
    """Run one call in a fresh process; its wall time, RSS after imports and peak RSS (bytes)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", CHILD, str(folder), what], capture_output=True, text=True, env=env, check=True)
    return json.loads(proc.stdout)


def build(folder: Path, clips: int, jobs: int) -> None:
    """Write the corpus in ``jobs`` processes, each a run of whole shards."""
    per_job = -(-clips // SHARD_SIZE // jobs) * SHARD_SIZE  # whole shards per job
    starts = range(0, clips, per_job)
    with ProcessPoolExecutor(jobs) as pool:
        for f in [pool.submit(_write_part, folder, first, min(per_job, clips - first)) for first in starts]:
            f.result()


def _write_part(folder: Path, first: int, clips: int) -> None:
    write_scale_corpus(folder, clips, first=first)  # returns the samples; a worker must not pickle them back


def quarter_view(folder: Path) -> Path:
    """A corpus folder of symlinks to the first quarter of ``folder``'s shards and their stats."""
    view = folder / "quarter"
    if view.is_dir():
        return view
    for sub in ("shards", "stats/_codes"):
        (view / sub).mkdir(parents=True, exist_ok=True)
    (view / "tokenizer").symlink_to(folder / "tokenizer")
    for tar in list_shards(folder)[: len(list_shards(folder)) // 4]:
        (view / "shards" / tar.name).symlink_to(tar)
        for sub in ("stats", "stats/_codes"):
            (view / sub / f"{tar.stem}.parquet").symlink_to(folder / sub / f"{tar.stem}.parquet")
    return view


def mb(n: float) -> str:
    return f"{n / 1e6:,.1f} MB"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clips", type=int, default=1_000_000)
    ap.add_argument("--dir", type=Path, required=True, help="corpus folder; built there unless it holds one")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="processes writing the corpus")
    args = ap.parse_args()
    if args.clips % 3 == 0:
        ap.error("--clips must leave the last file cut (not a multiple of 3), so that resume has a partly done file")

    folder = args.dir
    if not list_shards(folder):
        t = time.perf_counter()
        build(folder, args.clips, args.jobs)
        print(f"built {args.clips:,} clips in {len(list_shards(folder)):,} shards in {time.perf_counter() - t:.0f} s ({args.jobs} processes)")
    n_shards = len(list_shards(folder))
    print(f"corpus {folder}: {n_shards:,} shards of {SHARD_SIZE} clips\n")

    rows = [("index_shards", "old: tar header scan", folder, "index_old"), ("index_shards", "new: stats footers", folder, "index_new")]
    quarter = quarter_view(folder)
    rows += [(what, f"{name} shards", where, call) for what, call in (("summarize", "summary"), ("code counts", "codes"))
             for name, where in ((f"1/4: {len(list_shards(quarter)):,}", quarter), (f"all {n_shards:,}", folder))]
    print(f"{'call':<14}{'how / on':<24}{'wall':>9}{'peak RSS':>13}{'above imports':>15}")
    for what, how, where, call in rows:
        m = measure(where, call)
        clips = f"   ({m['clips']:,} clips)" if "clips" in m else ""
        print(f"{what:<14}{how:<24}{m['seconds']:>8.2f}s{mb(m['peak']):>13}{mb(m['peak'] - m['rss']):>15}{clips}")

    print(f"\n{'resume: sent to every decode task':<38}{'keys':>10}{'pickled':>14}{'wall':>9}")
    for call, label in (("done_keys", "done_keys(out) (before)"), ("partial_keys", "partial_keys(out, done_files(out))")):
        m = measure(folder, call)
        print(f"{label:<38}{m['keys']:>10,}{m['pickled']:>12,} B{m['seconds']:>8.2f}s")


if __name__ == "__main__":
    main()
