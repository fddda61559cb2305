"""Generation speed at full size, side by side: each inference path against today's (fp32, ordinary steps).

    python benchmarks/bench_generate.py --seconds 10 --threads 2                      # CPU: small, fp32 vs bf16 vs int8
    python benchmarks/bench_generate.py --device cuda --presets small large --seconds 10   # GPU: + bf16 + CUDA graphs
    python benchmarks/bench_generate.py --positions --seconds 10 --threads 2          # stages with index vs time positions

Everything runs at random weights, built in memory: the small preset's three
backbones at their full architectures (as ``bench_tokenize.py`` builds them),
quantizer arrays of the right shapes filled with noise (nothing is fitted), and
the preset's three stages (small: 6 x 1024, large: 24 x 1024). Random weights
sample random tokens, which cost exactly what trained weights' tokens cost.
Quality (held-out loss per precision) needs trained weights: see
``tests/test_precision.py`` and ``benchmarks/bench_precision.py``.

For each preset:

1. one sample of ``--seconds`` per variant (text -> semantic -> coarse -> fine
   -> Encodec decode -> CLAP score): wall seconds per stage, the real-time
   factor (wall seconds per second of audio; below 1 is faster than real time)
   and its ratio to the first variant, today's path;
2. with the last (fastest) variant: ``--samples`` samples as one batch vs one
   sample, each of ``--batch-seconds``;
3. with the last variant, ``MusicLM.stream``: the time to the first chunk and
   to the first second of audio.

Variants: CPU fp32 / bf16 / int8 (ordinary steps); CUDA fp32 / bf16 (ordinary
steps, a launch per kernel) / bf16 with CUDA graphs. Needs neither soundfile,
soxr, ray nor faiss, so it runs as is on a machine with torch and transformers.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from bench_tokenize import small_random_config  # noqa: E402
from bench_train_vs_onthefly import random_quantizers  # noqa: E402

from musiclm.config import STAGES, load_config, to_dict  # noqa: E402
from musiclm.generation import MusicLM, Stage  # noqa: E402
from musiclm.models.layout import layout_for  # noqa: E402
from musiclm.models.transformer import MusicTransformer  # noqa: E402
from musiclm.pipeline.tokenizer import Tokenizer  # noqa: E402
from musiclm.shards.tokenizer_folder import FORMAT_VERSION, fingerprint  # noqa: E402

PROMPT = "an upbeat jazz trio with brushed drums"


def random_parts(preset: str, device: str, seed: int = 0, positions: str | None = None) -> tuple[Tokenizer, dict[str, Stage]]:
    """The small backbones (random weights, noise quantizers) and ``preset``'s three stages at random weights, fp32
    (with ``positions``: that ``model.positions`` instead of the preset's)."""
    cfg = small_random_config(clap_codes=1024)
    t = cfg.tokenize
    tok = Tokenizer.from_config(t, device=device)
    tok.quantizers = random_quantizers(tok, seed)
    record = {"format": FORMAT_VERSION, "config": to_dict(t), "backbones": {}, "quantizers": {}, "streams": tok.streams()}
    record["fingerprint"] = fingerprint(record)
    tok.record = record
    stage_cfg = replace(load_config(preset), tokenize=t)
    if positions is not None:
        stage_cfg = replace(stage_cfg, model=replace(stage_cfg.model, positions=positions))
    torch.manual_seed(seed)
    stages = {}
    for name in STAGES:
        layout = layout_for(name, tok.info, stage_cfg.stages.get(name))
        stages[name] = Stage(MusicTransformer.for_layout(stage_cfg.model, layout).to(device).eval(), layout, stage_cfg)
    return tok, stages


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed_generation(lm: MusicLM, seconds: float, samples: int, seed: int, device: str):
    sync(device)
    t0 = time.perf_counter()
    g = lm.generate_with_details(PROMPT, seconds, num_samples=samples, keep=1, seed=seed)
    sync(device)
    return g, time.perf_counter() - t0


def first_audio(lm: MusicLM, seconds: float, device: str) -> tuple[float, float, float]:
    """Stream ``seconds``: wall seconds to the first chunk, to the first second of audio, and in all."""
    sync(device)
    t0 = time.perf_counter()
    got, first, first_second = 0, None, None
    for chunk in lm.stream(PROMPT, seconds, seed=5):
        got += len(chunk)
        first = first if first is not None else time.perf_counter() - t0
        if first_second is None and got >= lm.sample_rate:
            first_second = time.perf_counter() - t0
    return first, first_second if first_second is not None else float("nan"), time.perf_counter() - t0


def variants(device: str) -> list[tuple[str, str, bool]]:
    """(label, precision, cuda graphs); the first is today's path."""
    if device.startswith("cuda"):
        return [("fp32 eager (today)", "fp32", False), ("bf16 eager", "bf16", False), ("bf16 + CUDA graphs", "bf16", True)]
    return [("fp32 (today)", "fp32", False), ("bf16", "bf16", False), ("int8", "int8", False)]


def bench_preset(preset: str, args) -> None:
    t0 = time.perf_counter()
    tok, stages = random_parts(preset, args.device)
    c = stages["semantic"].cfg.model
    print(f"\n== {preset}: {c.n_layers} layers x {c.d_model} per stage, random weights; built in {time.perf_counter() - t0:.0f} s")
    for st in stages.values():
        print(f"  {st.layout.describe()}; window {st.layout.window_seconds:g} s, {st.model.num_parameters() / 1e6:.0f} M parameters")

    print(f"\n1. one sample of {args.seconds:g} s per variant")
    head = f"  {'variant':<20}" + "".join(f"{k:>9}" for k in (*STAGES, "decode", "score")) + f"{'total':>9}{'RTF':>7}{'vs today':>10}"
    print(head)
    base = None
    lm = None
    for label, precision, graphs in variants(args.device):
        lm = MusicLM(tok, stages, precision=precision, cuda_graphs=graphs)
        lm.generate_with_details(PROMPT, min(args.seconds, 2.0), num_samples=1, seed=123)  # warm-up: allocator, threads, graph capture
        g, wall = timed_generation(lm, args.seconds, 1, 0, args.device)
        audio_s = g.audio.shape[1] / g.sample_rate
        rtf = wall / audio_s
        base = base or rtf
        cells = "".join(f"{g.timings[k]:8.1f}s" for k in (*STAGES, "decode", "score"))
        print(f"  {label:<20}{cells}{wall:8.1f}s{rtf:7.2f}{base / rtf:9.2f}x", flush=True)
    assert lm is not None
    tokens = {name: sum(w.end - w.known for w in g.windows if w.stage == name) * lm.stages[name].layout.target_levels for name in STAGES}
    print(f"  ({', '.join(f'{n} {k} tokens' for n, k in tokens.items())} per sample; the last variant: "
          f"{', '.join(f'{n} {1000 * g.timings[n] / k:.2f} ms/token' for n, k in tokens.items())})")  # fmt: skip

    n = args.samples
    print(f"\n2. {label}: {n} samples of {args.batch_seconds:g} s as one batch vs one sample")
    lm.generate_with_details(PROMPT, args.batch_seconds, num_samples=n, keep=1, seed=124)  # warm-up at this batch (graph capture)
    one, one_wall = timed_generation(lm, args.batch_seconds, 1, 1, args.device)
    batch, batch_wall = timed_generation(lm, args.batch_seconds, n, 1, args.device)
    for k in (*STAGES, "decode", "score"):
        print(f"  {k:>8}  one {one.timings[k]:7.2f}s   batch of {n} {batch.timings[k]:7.2f}s")
    print(f"  total: one {one_wall:.2f} s, batch of {n} {batch_wall:.2f} s = {batch_wall / one_wall:.2f}x the time of one "
          f"({n * one_wall / batch_wall:.2f}x the samples per second)")

    print(f"\n3. {label}: stream {args.seconds:g} s")
    first, first_second, total = first_audio(lm, args.seconds, args.device)
    print(f"  first chunk after {first:.2f} s, first second of audio after {first_second:.2f} s, all {args.seconds:g} s after {total:.2f} s")


def bench_positions(preset: str, args) -> None:
    """One sample of --seconds with stages of each positions kind, the device's default precision, side by side."""
    print(f"\n4. {preset}: positions index vs time, one sample of {args.seconds:g} s each, {args.repeats} alternating runs")
    lms = {}
    for kind in ("index", "time"):
        tok, stages = random_parts(preset, args.device, positions=kind)
        lms[kind] = MusicLM(tok, stages)
        lms[kind].generate_with_details(PROMPT, min(args.seconds, 2.0), num_samples=1, seed=123)  # warm-up
    walls: dict[str, list[float]] = {"index": [], "time": []}
    for _ in range(args.repeats):
        for kind, lm in lms.items():
            walls[kind].append(timed_generation(lm, args.seconds, 1, 0, args.device)[1])
    best = {k: min(v) for k, v in walls.items()}
    for kind, wall in best.items():
        print(f"  {kind:<6} best {wall:7.2f} s  (runs: {', '.join(f'{w:.2f}' for w in walls[kind])})  RTF {wall / args.seconds:.2f}")
    print(f"  time / index: {best['time'] / best['index']:.3f}x the wall time ({lms['time'].precision})")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=10.0, help="audio of each timed generation (default 10)")
    ap.add_argument("--samples", type=int, default=4, help="samples in the batch comparison (default 4)")
    ap.add_argument("--batch-seconds", type=float, default=None, help="audio per sample in the batch comparison (default: --seconds)")
    ap.add_argument("--presets", nargs="+", default=None, help="small and/or large (default: small on CPU, small large on CUDA)")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--positions", action="store_true", help="only compare stages with index and with time positions")
    ap.add_argument("--repeats", type=int, default=3, help="alternating runs per positions kind (default 3)")
    args = ap.parse_args(argv)
    args.batch_seconds = args.batch_seconds or args.seconds
    torch.set_num_threads(args.threads)
    presets = args.presets or (["small", "large"] if args.device.startswith("cuda") else ["small"])
    where = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"{torch.get_num_threads()} CPU threads"
    print(f"generation benchmark on {args.device} ({where}), torch {torch.__version__}")
    for preset in presets:
        (bench_positions if args.positions else bench_preset)(preset, args)
    print(f"\nload average at the end (1/5/15 min): {' / '.join(f'{x:.1f}' for x in os.getloadavg())} on {os.cpu_count()} CPUs "
          f"(other work on the machine skews wall times)")


if __name__ == "__main__":
    main()
