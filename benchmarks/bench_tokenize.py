"""Tokenize throughput against bare backbone compute, and peak memory against corpus size.

    python benchmarks/bench_tokenize.py speed    # small architectures at random weights
    python benchmarks/bench_tokenize.py memory   # tiny preset, corpus 1x vs 4x

speed: a corpus of synthesised 30 s clips is tokenized by the Ray job (with a
tokenizer fitted beforehand, so only the main pass is timed). In the same
process, the three backbones' bare forward passes run on the same audio, at the
same torch thread count the actors use. Efficiency = pipeline audio-seconds per
wall-second / bare audio-seconds per compute-second. Reported twice: end to end
(Ray start-up and actor loading included) and steady state (first to last clip).

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
        mert=replace(t.mert, model="random", arch={}),
        encodec=replace(t.encodec, model="random", arch={}),
        # 2 minutes of fit audio: 4 points per code is all they can give 1024 MERT and Encodec codes
        fit=replace(t.fit, max_seconds=120.0, mert_seconds=120.0, max_points=20000, niter=5, min_points_per_code=4),
        audio=replace(t.audio, segment_seconds=30.0),
        batch_size=1,
    )
    return replace(cfg, tokenize=t)


def write_corpus(root: Path, n: int, seconds: float, seed: int = 0) -> None:
    from musiclm.pipeline.audio import write_audio
    from musiclm.pipeline.synth import KINDS, synth_clip

    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        write_audio(root / f"clip_{i:04d}.wav", synth_clip(KINDS[i % len(KINDS)], seconds, 44100, seed + i), 44100)


def bare_compute(tok, files: list[Path], threads: int) -> float:
    """Seconds the three backbones take on ``files`` (forward passes only, decoded audio given)."""
    import torch

    from musiclm.pipeline.audio import load_for_rates

    torch.set_num_threads(threads)
    clips = [load_for_rates(f, 0.0, None, tok.sample_rates) for f in files]
    tok.mert_features(clips[0][tok.mert.sample_rate][: tok.mert.sample_rate])  # warm-up
    total = 0.0
    for c in clips:
        t0 = time.perf_counter()
        tok.mert_features(c[tok.mert.sample_rate])
        tok.encode_acoustic(c[tok.encodec.sample_rate])
        tok.clap_audio_embed(tok.clap_windows(c[tok.clap.sample_rate]))
        total += time.perf_counter() - t0
    return total


def speed(args) -> None:
    import musiclm.pipeline.tokenize_job as job
    from musiclm.pipeline.tokenizer import Tokenizer

    work = Path(tempfile.mkdtemp(prefix="bench-tokenize-"))
    fit_corpus, corpus = work / "fit", work / "corpus"
    write_corpus(fit_corpus, 4, 30.0, seed=100)
    write_corpus(corpus, args.clips, 30.0)
    cfg = small_random_config(args.clap_codes)
    print(f"fitting a tokenizer (small architectures, random weights) on {fit_corpus} ...", flush=True)
    job.run_tokenize(fit_corpus, work / "fit_tokens", cfg)

    stamps: list[tuple[float, float]] = []  # (time, audio seconds so far) per clip
    base = job._progress

    class Recorder(base):
        def update(self, rel, clips, failed, seconds, elapsed):
            stamps.append((time.perf_counter(), seconds))
            super().update(rel, clips, failed, seconds, elapsed)

    job._progress = Recorder
    t0 = time.perf_counter()
    summary = job.run_tokenize(corpus, work / "tokens", None, tokenizer_dir=work / "fit_tokens" / "tokenizer")
    wall = time.perf_counter() - t0
    job._progress = base
    audio = summary.seconds

    threads = job.actor_threads(os.cpu_count() or 1, 1, gpu=False)
    tok = Tokenizer.load(work / "fit_tokens" / "tokenizer")
    bare = bare_compute(tok, sorted(corpus.glob("*.wav")), threads)
    bare_rate = audio / bare
    e2e_rate = audio / wall
    # rows of one actor batch arrive together: the steady state starts once the first batch is in
    t_first = stamps[0][0]
    a_first = max(a for t, a in stamps if t - t_first < 0.5)
    t_last, a_last = stamps[-1]
    steady_rate = (a_last - a_first) / (t_last - t_first)
    print()
    print(f"corpus: {args.clips} clips x 30 s = {audio:.0f} s of audio; torch threads per actor / bare: {threads}")
    print(f"bare backbone compute:  {bare:7.1f} s  -> {bare_rate:6.2f} audio-s/s")
    print(f"pipeline end to end:    {wall:7.1f} s  -> {e2e_rate:6.2f} audio-s/s   efficiency {e2e_rate / bare_rate:.2f}")
    print(f"pipeline steady state:  {t_last - t_first:7.1f} s  -> {steady_rate:6.2f} audio-s/s   efficiency {steady_rate / bare_rate:.2f}")
    print(f"inside the actors:      {summary.compute:7.1f} s in the tokenizer -> {audio / summary.compute:6.2f} audio-s/s   ({summary.compute / bare:.2f} x bare)")


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
    import numpy as np

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
    ap.add_argument("--clips", type=int, default=12, help="speed: 30 s clips in the timed corpus")
    ap.add_argument("--clap-codes", type=int, default=16, help="speed: CLAP codebook size (too few windows to fit 1024)")
    ap.add_argument("--files", type=int, default=30, help="memory: files in the 1x corpus")
    ap.add_argument("--seconds", type=float, default=6.0, help="memory: seconds per file")
    args = ap.parse_args()
    speed(args) if args.what == "speed" else memory(args)


if __name__ == "__main__":
    main()
