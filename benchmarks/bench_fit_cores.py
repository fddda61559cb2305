"""The quantizer fit's feature extraction on one core against every core, side by side.

    python benchmarks/bench_fit_cores.py [--minutes 4]

The small architectures at random weights (benchmarks/bench_tokenize.py) fit
their quantizers on the same synthesised corpus twice in one process: once with
the fit's actor held to one torch thread (as before, when it reserved one CPU),
once as `musiclm tokenize` runs it now (the actor gets every core: decoding the
fit sample is light next to dense CLAP windows). Prints the feature seconds,
the actor's CPU seconds per wall second ("cores busy") and the ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> None:
    from dataclasses import replace

    from bench_tokenize import small_random_config, write_corpus
    from rich.console import Console

    import musiclm.pipeline.tokenize_job as job

    ap = argparse.ArgumentParser()
    ap.add_argument("--minutes", type=float, default=4.0, help="audio in the fit sample (30 s clips)")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-fit-cores-"))
    clips = max(1, round(args.minutes * 2))
    write_corpus(work / "corpus", clips, 30.0)
    cfg = small_random_config(8)
    t = cfg.tokenize
    cfg = replace(cfg, tokenize=replace(t, fit=replace(t.fit, max_seconds=clips * 30.0, mert_seconds=clips * 30.0)))
    cores = os.cpu_count() or 1
    rows = {}
    every_core = job._fit_resources
    job._tokenize_all = lambda *a, **k: None  # the fit alone: the main pass is not what is measured
    for name, choose in (("one core", lambda res: res._replace(threads=1)), (f"every core ({cores})", every_core)):
        job._fit_resources = choose
        try:
            out = work / name.split()[0]
            job.run_tokenize(work / "corpus", out, cfg, console=Console(stderr=True, quiet=True))
        finally:
            job._fit_resources = every_core
        fit = json.loads((out / "tokenizer" / "tokenizer.json").read_text())["fit"]
        rows[name] = (fit["seconds_taken"]["features"], fit["feature_cores"])
    print(f"\nfit features of {clips} x 30 s (small architectures, random weights), {cores} cores on this machine")
    for name, (seconds, busy) in rows.items():
        print(f"{name:>18}: {seconds:7.1f} s of features, {busy:.2f} cores busy")
    (one, _), (every, _) = rows.values()
    print(f"speed-up: {one / every:.2f}x")


if __name__ == "__main__":
    main()
