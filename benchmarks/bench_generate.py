"""Generation speed at the `small` size: real-time factor, time per stage, and N samples in one batch vs N runs.

    python benchmarks/bench_generate.py --seconds 10 --samples 4 --threads 2

Everything runs at random weights, built in memory: the small preset's three
backbones at their full architectures (as ``bench_tokenize.py`` builds them),
quantizer arrays of the right shapes filled with noise (nothing is fitted), and
three 6 x 1024 MusicTransformer stages. Random weights sample random tokens,
which cost exactly what trained weights' tokens cost.

1. One full generation of ``--seconds`` (text -> semantic -> coarse -> fine ->
   Encodec decode -> CLAP score), KV-cached: wall seconds per stage and the
   real-time factor (wall seconds per second of audio; below 1 is faster than
   real time).
2. ``--samples`` samples as one batch through every stage vs the same number
   of single-sample runs, each of ``--batch-seconds`` (default 2).

On a 2-core CPU a token of a 6 x 1024 stage costs about 30-40 ms, so 10 s of
audio (about 6,500 sampled tokens) takes minutes: there, use fewer seconds,
e.g. ``--seconds 3 --batch-seconds 1`` (about 4 minutes in all).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from bench_tokenize import small_random_config  # noqa: E402
from bench_train_vs_onthefly import random_quantizers  # noqa: E402

from musiclm.config import STAGES, to_dict  # noqa: E402
from musiclm.generation import MusicLM, Stage  # noqa: E402
from musiclm.models.layout import layout_for  # noqa: E402
from musiclm.models.transformer import MusicTransformer  # noqa: E402
from musiclm.pipeline.tokenizer import FORMAT_VERSION, Tokenizer, fingerprint  # noqa: E402

PROMPT = "an upbeat jazz trio with brushed drums"


def random_small_model(device: str = "cpu", seed: int = 0) -> MusicLM:
    """The small preset at random weights: backbones, quantizer arrays and stages, all in memory."""
    cfg = small_random_config(clap_codes=1024)
    t = cfg.tokenize
    tok = Tokenizer.from_config(t, device=device)
    tok.quantizers = random_quantizers(tok, seed)
    record = {"format": FORMAT_VERSION, "config": to_dict(t), "backbones": {}, "quantizers": {}, "streams": tok.streams()}
    record["fingerprint"] = fingerprint(record)
    tok.record = record
    torch.manual_seed(seed)
    stages = {}
    for name in STAGES:
        layout = layout_for(name, tok.info, cfg.stages.get(name))
        stages[name] = Stage(MusicTransformer.for_layout(cfg.model, layout).to(device).eval(), layout, cfg)
    return MusicLM(tok, stages)


def run(lm: MusicLM, seconds: float, samples: int, seed: int):
    t0 = time.perf_counter()
    g = lm.generate_with_details(PROMPT, seconds, num_samples=samples, keep=1, seed=seed)
    return g, time.perf_counter() - t0


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=10.0, help="audio of the timed full generation (default 10)")
    ap.add_argument("--samples", type=int, default=4, help="samples in the batch comparison (default 4)")
    ap.add_argument("--batch-seconds", type=float, default=2.0, help="audio per sample in the batch comparison (default 2)")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    batch_seconds = args.batch_seconds

    t0 = time.perf_counter()
    lm = random_small_model(args.device)
    c = lm.stages["semantic"].cfg.model
    print(f"generation benchmark: preset small at random weights, {c.n_layers} layers x {c.d_model} per stage, "
          f"{torch.get_num_threads()} CPU threads, device {args.device}; built in {time.perf_counter() - t0:.0f} s")
    for name, st in lm.stages.items():
        lay = st.layout
        print(f"  {lay.describe()}; window {lay.window_seconds:g} s, {st.model.num_parameters() / 1e6:.0f} M parameters")
    s = lm._settings(None, None, None, None)
    print(f"  guidance {s['semantic'].cfg_scale:g} on semantic and coarse (2 rows per sample), none on fine")
    lm.generate_with_details(PROMPT, 0.2, seed=123)  # warm-up (allocator, thread pool), not timed

    print(f"\n1. one sample of {args.seconds:g} s, KV cache")
    g, wall = run(lm, args.seconds, 1, seed=0)
    audio_s = g.audio.shape[1] / g.sample_rate
    for name in STAGES:
        wins = [w for w in g.windows if w.stage == name]
        levels = lm.stages[name].layout.target_levels
        tokens = sum(w.end - w.known for w in wins) * levels
        t = g.timings[name]
        print(f"  {name:>8}: {t:7.1f} s  {len(wins):3d} windows  {tokens:6d} tokens sampled  {1000 * t / tokens:6.1f} ms/token")
    for k in ("prompts", "decode", "score"):
        print(f"  {k:>8}: {g.timings[k]:7.1f} s")
    print(f"  total {wall:.1f} s for {audio_s:.2f} s of audio: real-time factor {wall / audio_s:.2f} (wall s per audio s)")

    n = args.samples
    print(f"\n2. {n} samples of {batch_seconds:g} s: one batch vs {n} single runs")
    gb, batch_wall = run(lm, batch_seconds, n, seed=1)
    singles = [run(lm, batch_seconds, 1, seed=10 + i) for i in range(n)]
    single_wall = sum(w for _, w in singles)
    print(f"  {'':>8}  {'batch of ' + str(n):>12}  {str(n) + ' single runs':>14}")
    for k in (*STAGES, "decode", "score"):
        print(f"  {k:>8}  {gb.timings[k]:11.1f}s  {sum(s.timings[k] for s, _ in singles):13.1f}s")
    print(f"  {'total':>8}  {batch_wall:11.1f}s  {single_wall:13.1f}s   -> the batch costs {batch_wall / single_wall:.2f} of {n} runs "
          f"({single_wall / batch_wall:.2f}x faster); {batch_wall / n / batch_seconds:.2f} wall s per audio s per sample")
    print(f"\nload average at the end (1/5/15 min): {' / '.join(f'{x:.1f}' for x in os.getloadavg())} on {os.cpu_count()} CPUs "
          f"(other work on the machine skews wall times)")


if __name__ == "__main__":
    main()
