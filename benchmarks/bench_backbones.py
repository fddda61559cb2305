"""The backbones' cost, side by side: seconds of compute per second of audio for MERT-v0 and w2v-BERT 2.0
(the semantic models of `small` and `open`) and Encodec 24 kHz and DAC 24 kHz (their codecs, encode and
decode), at full size with random weights, on the CPU and, when there is one, on CUDA.

    python benchmarks/bench_backbones.py                 # 10 s clips, 3 repeats, every CPU core
    python benchmarks/bench_backbones.py --seconds 4 --repeats 1 --threads 2

Each backbone is rebuilt from its checkpoint's real config (tests/fixtures/pretrained/, via
tests/pretrained.py), saved, and loaded back through the project's loaders (``load_semantic``,
``load_codec``) as tokenize loads it: the semantic models run only the layers up to the one read
(layer 7 of 12 for MERT-v0, of 24 for w2v-BERT 2.0), and their preprocessing is included; the codecs
keep 8 codebooks (Encodec at 6 kbps, DAC's first 8 of 32). Random weights cost what trained ones do.
The figure is the median wall time over ``--repeats`` after one warm-up call, divided by the clip's
seconds: below 1 is faster than real time. Ratios compare each `open` backbone with the `small` one
it replaces.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

SEMANTIC = {"MERT-v0": ("small", "mert"), "w2v-BERT 2.0": ("open", "w2v-bert")}
CODECS = {"Encodec 24 kHz": ("small", "encodec"), "DAC 24 kHz": ("open", "dac")}


def timed(call, repeats: int, sync) -> float:
    """Median wall seconds of ``call()`` over ``repeats`` after one warm-up call."""
    call()
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        call()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure(folders, device: str, seconds: float, repeats: int) -> dict[str, float]:
    """{"<backbone> <what>": seconds per second of audio} on ``device``."""
    import torch

    from musiclm.config import load_config
    from musiclm.models.codec import load_codec
    from musiclm.models.semantic import load_semantic
    from musiclm.pipeline.synth import synth_clip

    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    out: dict[str, float] = {}
    for name, (preset, key) in SEMANTIC.items():
        spec = replace(load_config(preset).tokenize.semantic, model=str(folders[key]))
        sem = load_semantic(spec)
        sem.model.to(device)
        audio = synth_clip("mix", seconds, sem.sample_rate, 0)[None]

        def forward():
            with torch.inference_mode():
                sem.hidden(sem.inputs(audio, device))

        out[f"{name} features (layer {spec.layer})"] = timed(forward, repeats, sync) / seconds
        del sem
    for name, (preset, key) in CODECS.items():
        codec = load_codec(replace(load_config(preset).tokenize.codec, model=str(folders[key])))
        codec.model.to(device)
        x = torch.from_numpy(synth_clip("mix", seconds, codec.sample_rate, 0))[None].to(device)
        with torch.inference_mode():
            codes = codec.encode(x)
        out[f"{name} encode ({codec.num_quantizers} codebooks)"] = timed(lambda: _no_grad(codec.encode, x), repeats, sync) / seconds
        out[f"{name} decode ({codec.num_quantizers} codebooks)"] = timed(lambda: _no_grad(codec.decode, codes), repeats, sync) / seconds
        del codec
    return out


def _no_grad(fn, x):
    import torch

    with torch.inference_mode():
        return fn(x)


def report(device: str, costs: dict[str, float]) -> None:
    print(f"\n{device}: seconds per second of audio (lower is faster)")
    width = max(map(len, costs))
    for what, cost in costs.items():
        print(f"  {what:<{width}}  {cost:8.3f}")
    keys = list(costs)  # MERT, w2v-BERT, Encodec encode, Encodec decode, DAC encode, DAC decode
    for new, old in ((keys[1], keys[0]), (keys[4], keys[2]), (keys[5], keys[3])):
        print(f"  ratio {new.split(' (')[0]} / {old.split(' (')[0]}: {costs[new] / costs[old]:.2f}x")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=10.0, help="clip length")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch CPU threads")
    ap.add_argument("--folders", type=Path, default=None, help="where to save the stand-in checkpoints (default: a temp folder)")
    args = ap.parse_args()

    import torch

    from tests.pretrained import StandinFolders

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        folders = StandinFolders(args.folders or Path(tmp))
        print(f"torch {torch.__version__}, {args.threads} CPU threads, {args.seconds:g} s clips, median of {args.repeats}")
        report("cpu", measure(folders, "cpu", args.seconds, args.repeats))
        if torch.cuda.is_available():
            report(f"cuda ({torch.cuda.get_device_name()})", measure(folders, "cuda", args.seconds, args.repeats))


if __name__ == "__main__":
    main()
