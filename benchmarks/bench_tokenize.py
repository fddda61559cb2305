"""Tokenize throughput against bare batched compute, and peak memory against corpus size.

    python benchmarks/bench_tokenize.py speed    # small architectures at random weights
    python benchmarks/bench_tokenize.py memory   # tiny preset, corpus 1x vs 4x

speed: a corpus of synthesised 30 s clips is tokenized by the Ray job (with a
tokenizer fitted beforehand, so only the main pass is timed). Then, in the same
process, on the same decoded audio and at the torch thread count the actors use:

- bare batched: ``Tokenizer.tokenize_batch`` over the batches the job planned
  (read back from its plan.parquet), as the actor calls it;
- bare batch-1: ``Tokenizer.tokenize`` clip by clip.

Efficiency = pipeline audio-seconds per wall-second / bare batched audio-seconds
per compute-second; the goal is 0.9 or more. Reported end to end (Ray start-up,
probing, planning and actor loading included) and in steady state (from the
first planned batch whole at the driver to the last but one: the rows of a batch
reach the driver together, possibly one batch after the actor finished it).
The pipeline's shards are also compared with the bare batched tokens (same
batches, same thread count: they should be equal).

memory: the tiny preset tokenizes a corpus, then one 4x larger, in fresh
processes; the peak of the summed proportional set size (PSS) of the command's
whole process tree (driver, Ray services, workers) is sampled every 0.2 s.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def small_random_config(clap_codes: int):
    """The small preset with every backbone at its full architecture but random weights."""
    from musiclm.config import load_config

    cfg = load_config("small")
    t = cfg.tokenize
    t = replace(
        t,
        clap=replace(t.clap, model="random", arch={}, features={}, codebook_size=clap_codes),
        semantic=replace(t.semantic, model="random", arch={}),
        codec=replace(t.codec, model="random", arch={}),
        # 2 minutes of fit audio: 4 points per code is all they can give 1024 MERT and Encodec codes
        fit=replace(t.fit, max_seconds=120.0, semantic_seconds=120.0, max_points=20000, niter=5, min_points_per_code=4),
        audio=replace(t.audio, segment_seconds=30.0),
    )
    return replace(cfg, tokenize=t)


def write_corpus(root: Path, n: int, seconds: float, seed: int = 0) -> None:
    from musiclm.pipeline.audio_out import write_audio
    from musiclm.pipeline.synth import KINDS, synth_clip

    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        write_audio(root / f"clip_{i:04d}.wav", synth_clip(KINDS[i % len(KINDS)], seconds, 44100, seed + i), 44100)


def planned_clips(out: Path, corpus: Path, segment_seconds: float, rates: tuple[int, ...]) -> list[list[dict]]:
    """The segments of each batch the job planned (``out/plan.parquet``), decoded as the job decodes them."""
    import pyarrow.parquet as pq

    from musiclm.pipeline.audio import load_for_rates, plan_segments

    plan = pq.read_table(out / "plan.parquet").to_pylist()
    batches: dict[int, list[dict]] = {}
    for row in plan:
        if row["batch"] >= 0:
            batches.setdefault(row["batch"], []).append(row)
    clips = []
    for number in sorted(batches):
        clips.append([])
        for row in batches[number]:
            for i, (start, seconds) in enumerate(plan_segments(row["seconds"], segment_seconds)):
                clips[-1].append({"rel": row["rel"], "segment": i, "seconds": seconds, "audio": load_for_rates(corpus / row["rel"], start, seconds, rates)})
    return clips


def timed(fn) -> tuple[float, object]:
    t0 = time.perf_counter()
    result = fn()
    return time.perf_counter() - t0, result


def speed(args) -> None:
    import torch
    import webdataset as wds

    import musiclm.pipeline.main_pass as main_pass
    import musiclm.pipeline.tokenize_job as job
    from musiclm.pipeline.ray_runtime import actor_threads
    from musiclm.pipeline.tokenizer import Tokenizer
    from musiclm.shards.format import TokenSample, list_shards, sample_key

    work = Path(tempfile.mkdtemp(prefix="bench-tokenize-"))
    fit_corpus, corpus = work / "fit", work / "corpus"
    write_corpus(fit_corpus, 4, 30.0, seed=100)
    write_corpus(corpus, args.clips, 30.0)
    cfg = small_random_config(args.clap_codes)
    print(f"fitting a tokenizer (small architectures, random weights) on {fit_corpus} ...", flush=True)
    job.run_tokenize(fit_corpus, work / "fit_tokens", cfg)

    stamps: list[tuple[float, float]] = []  # (time, audio seconds tokenized so far) per row
    base = main_pass.TokenizeProgress

    class Recorder(base):
        def update(self, seconds, summary, elapsed, gpu):
            stamps.append((time.perf_counter(), summary.seconds))
            super().update(seconds, summary, elapsed, gpu)

    main_pass.TokenizeProgress = Recorder
    t0 = time.perf_counter()
    try:
        wall, summary = timed(lambda: job.run_tokenize(corpus, work / "tokens", None, tokenizer_dir=work / "fit_tokens" / "tokenizer"))
    finally:
        main_pass.TokenizeProgress = base
    audio = summary.seconds

    threads = actor_threads(os.cpu_count() or 1, 1, gpu=False)
    torch.set_num_threads(threads)
    tok = Tokenizer.load(work / "fit_tokens" / "tokenizer")
    batches = planned_clips(work / "tokens", corpus, tok.cfg.audio.segment_seconds, tok.sample_rates)
    clips = [c for b in batches for c in b]
    tok.tokenize({sr: a[: 5 * sr] for sr, a in clips[0]["audio"].items()})  # warm-up
    batched, results = timed(lambda: [r for b in batches for r in tok.tokenize_batch([c["audio"] for c in b])])
    single, _ = timed(lambda: [tok.tokenize(c["audio"]) for c in clips])
    bare_rate = audio / batched

    shards = {s.key: s for s in (TokenSample.from_wds(x) for x in wds.WebDataset([str(p) for p in list_shards(work / "tokens")], shardshuffle=False, empty_check=False))}
    same = sum(
        all(np.array_equal(r[name], getattr(shards[sample_key(c["rel"], c["segment"])], name)) for name in ("semantic", "acoustic", "clap"))
        for c, r in zip(clips, results)
    )
    # when each planned batch had reached the driver whole (one actor: in order)
    ends = np.cumsum([sum(c["seconds"] for c in b) for b in batches])
    arrived = [next(t for t, a in stamps if a >= end - 1e-3) - t0 for end in ends]
    # steady state from the first batch to the last but one: robust to a lag of one batch between an
    # actor finishing a batch and its rows reaching the driver (the last two then arrive together)
    if len(batches) >= 3:
        steady_span = arrived[-2] - arrived[0]
        steady_rate = (ends[-2] - ends[0]) / steady_span
    else:
        steady_span, steady_rate = float("nan"), float("nan")
    e2e_rate = audio / wall
    sizes = [len(b) for b in batches]
    print()
    print(
        f"corpus: {args.clips} clips x 30 s = {audio:.0f} s of audio in {len(batches)} planned batches of {min(sizes)}-{max(sizes)} clips "
        f"(tokenize.batch_seconds = {tok.cfg.batch_seconds:g}); torch threads per actor and bare: {threads}"
    )
    print(f"bare batch-1 (tokenize):        {single:7.1f} s  -> {audio / single:6.2f} audio-s/s")
    print(f"bare batched (tokenize_batch):  {batched:7.1f} s  -> {bare_rate:6.2f} audio-s/s   ({single / batched:.2f}x batch-1)")
    print(f"pipeline end to end:            {wall:7.1f} s  -> {e2e_rate:6.2f} audio-s/s   efficiency {e2e_rate / bare_rate:.2f}")
    print(f"pipeline steady state:          {steady_span:7.1f} s  -> {steady_rate:6.2f} audio-s/s   efficiency {steady_rate / bare_rate:.2f}   (batches 2 to {len(batches) - 1})")
    print(f"inside the actors:              {summary.compute:7.1f} s in the tokenizer -> {audio / summary.compute:6.2f} audio-s/s   ({summary.compute / batched:.2f} x bare batched)")
    print(f"planned batches whole at the driver, s after the start: {', '.join(f'{t:.0f}' for t in arrived)}")
    print(f"pipeline shards equal to bare batched tokens: {same}/{len(clips)} clips")


def peak_pss(cmd: list[str]) -> tuple[float, float, int, list[float]]:
    """Run ``cmd``; return (peak summed PSS of its process tree in MiB, wall seconds, exit code, samples)."""
    import psutil

    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, "PYTHONPATH": str(ROOT)})
    peak = 0.0
    series: list[float] = []
    stop = threading.Event()

    def sample() -> None:
        nonlocal peak
        root = psutil.Process(proc.pid)
        while not stop.is_set():
            total = 0
            try:
                for p in [root, *root.children(recursive=True)]:
                    try:
                        total += p.memory_full_info().pss
                    except (psutil.NoSuchProcess, psutil.AccessDenied):
                        pass
            except psutil.NoSuchProcess:
                break
            peak = max(peak, total / 2**20)
            series.append(total / 2**20)
            time.sleep(0.2)

    t = threading.Thread(target=sample, daemon=True)
    t0 = time.time()
    t.start()
    code = proc.wait()
    stop.set()
    t.join()
    return peak, time.time() - t0, code, series


def memory(args) -> None:
    work = Path(tempfile.mkdtemp(prefix="bench-memory-"))
    fit = work / "fit"
    write_corpus(fit, 10, 8.0, seed=100)
    subprocess.run([sys.executable, "-m", "musiclm", "tokenize", fit, "--out", work / "fit_tokens", "--preset", "tiny"], check=True, capture_output=True)
    results = []
    for scale in (1, 4):
        corpus = work / f"corpus{scale}"
        write_corpus(corpus, args.files * scale, args.seconds, seed=scale * 1000)
        cmd = [sys.executable, "-m", "musiclm", "tokenize", str(corpus), "--out", str(work / f"tokens{scale}"), "--tokenizer", str(work / "fit_tokens" / "tokenizer")]
        peak, wall, code, series = peak_pss(cmd)
        assert code == 0, f"tokenize failed ({code})"
        results.append(peak)
        late = series[len(series) // 2 :]
        print(
            f"{scale}x corpus: {args.files * scale} files x {args.seconds:g} s   peak PSS {peak:7.1f} MiB   "
            f"median of the second half {np.median(late):7.1f} MiB   {len(series)} samples   wall {wall:5.1f} s",
            flush=True,
        )
    print(f"peak memory 4x / 1x: {results[1] / results[0]:.3f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["speed", "memory"])
    ap.add_argument("--clips", type=int, default=48, help="speed: 30 s clips in the timed corpus (48: 24 min of audio, about 24 min of run on 2 cores; 60 take 30)")
    ap.add_argument("--clap-codes", type=int, default=16, help="speed: CLAP codebook size (too few windows to fit 1024)")
    ap.add_argument("--files", type=int, default=30, help="memory: files in the 1x corpus")
    ap.add_argument("--seconds", type=float, default=6.0, help="memory: seconds per file")
    args = ap.parse_args()
    speed(args) if args.what == "speed" else memory(args)


if __name__ == "__main__":
    main()
