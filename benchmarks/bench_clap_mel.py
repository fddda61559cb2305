"""CLAP input features: transformers' ClapFeatureExtractor (numpy) vs ClapMel (torch).

``--windows`` windows of the ``small`` preset's CLAP window (10 s) at its CLAP
checkpoint's rate (laion/larger_clap_music: 48 kHz, settings from the offline
fixture), synthesised music. Both sides get the windows the way
``Tokenizer.clap_audio_embed`` has them (float32 arrays on the CPU); ClapMel's
CUDA time (when a GPU is present) starts with the windows already on the GPU and
ends after a synchronize. Each time is the median of ``--repeats`` runs after one
warm-up run: wall seconds, and the process's CPU seconds (all threads), which a
machine shared with other jobs inflates less than the wall time. On an
oversubscribed machine torch's OpenMP threads spin-wait at each of ClapMel's
small per-window ops and can burn 10-20x the CPU time (counted in both columns);
``OMP_WAIT_POLICY=PASSIVE`` or ``--threads 1`` shows the compute itself.

    python benchmarks/bench_clap_mel.py --windows 64 --threads 2
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # for tests.pretrained when run as a script

from musiclm.config import load_config
from musiclm.models.clap_mel import ClapMel
from musiclm.pipeline.synth import synth_clip
from tests.pretrained import fixture_dir


def median_seconds(fn: Callable[[], object], repeats: int, sync: Callable[[], None] = lambda: None) -> tuple[float, float]:
    """(wall, CPU) seconds of one call, each the median over ``repeats`` calls after a warm-up."""
    fn()
    sync()
    wall, cpu = [], []
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        sync()
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return statistics.median(wall), statistics.median(cpu)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--windows", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--truncation", default="rand_trunc", choices=["rand_trunc", "fusion"], help="rand_trunc: the small preset's unfused CLAP")
    args = ap.parse_args()

    from transformers import ClapFeatureExtractor

    torch.set_num_threads(args.threads)
    fe = ClapFeatureExtractor.from_pretrained(fixture_dir("clap"))
    sr, seconds = fe.sampling_rate, load_config("small").tokenize.clap.window_seconds
    n = round(seconds * sr)
    kinds = ("mix", "chord", "drums", "melody", "arpeggio")
    windows = [synth_clip(kinds[i % len(kinds)], seconds, sr, i)[:n].astype(np.float32) for i in range(args.windows)]
    mel = ClapMel(fe, args.truncation)

    def hf():
        return fe(windows, sampling_rate=sr, return_tensors="pt", truncation=args.truncation, padding="repeatpad")["input_features"]

    ref = hf()
    diff = (mel([torch.from_numpy(w) for w in windows])["input_features"] - ref).abs().max().item()
    print(f"{args.windows} windows x {seconds:g} s at {sr} Hz, truncation={args.truncation}, torch threads={args.threads}")
    print(f"max |torch - HF| = {diff:.2e} dB")
    hf_s, hf_cpu = median_seconds(hf, args.repeats)
    cpu_s, cpu_cpu = median_seconds(lambda: mel([torch.from_numpy(w) for w in windows]), args.repeats)
    print(f"{'':24}{'wall s':>8}{'windows/s':>11}{'HF / this':>11}{'CPU s':>8}{'HF / this':>11}")
    print(f"{'HF extractor (numpy)':24}{hf_s:8.3f}{args.windows / hf_s:11.1f}{1.0:11.2f}{hf_cpu:8.3f}{1.0:11.2f}")
    print(f"{'ClapMel, CPU':24}{cpu_s:8.3f}{args.windows / cpu_s:11.1f}{hf_s / cpu_s:11.2f}{cpu_cpu:8.3f}{hf_cpu / cpu_cpu:11.2f}")
    if torch.cuda.is_available():
        on_gpu = torch.from_numpy(np.stack(windows)).cuda()
        gpu_s, _ = median_seconds(lambda: mel(on_gpu), args.repeats, torch.cuda.synchronize)
        print(f"{'ClapMel, CUDA':24}{gpu_s:8.3f}{args.windows / gpu_s:11.1f}{hf_s / gpu_s:11.2f}  ({torch.cuda.get_device_name()})")
    else:
        print("ClapMel, CUDA: no GPU here")


if __name__ == "__main__":
    main()
