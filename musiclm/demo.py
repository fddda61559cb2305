"""``make demo``: the whole chain, offline, with the tiny preset.

    python -m musiclm.demo --out demo

1. synthesise a small corpus of music-like audio (tones, chords, drums, rain)
   in several formats and sample rates, plus a few broken files;
2. ``musiclm tokenize`` it (fits the tokenizer, writes shards, stats, errors);
3. ``musiclm stats`` with a plot;
4. ``musiclm train`` each stage for a few steps;
5. ``musiclm generate`` a wav from a text prompt.

Each step runs the same command a user would type; each is printed first.
Rerunning resumes: tokenize skips what is done, finished stages are kept.

Layer: top.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

from musiclm.cli import main as cli

PROMPT = "a calm piano over soft rain"


def step(title: str, args: list[str]) -> None:
    print(f"\n== {title}\n$ musiclm {' '.join(shlex.quote(str(a)) for a in args)}", flush=True)
    try:
        cli([str(a) for a in args])
    except SystemExit as e:
        if e.code:
            sys.exit(e.code)


def finished(run: Path, steps: int) -> bool:
    metrics = run / "metrics.jsonl"
    if not metrics.is_file():
        return False
    last = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    return bool(last) and max(m["step"] for m in last) >= steps


def run(out: Path, steps: int, seconds: float) -> None:
    from musiclm.pipeline.synth_corpus import make_bad_files, make_corpus

    corpus = out / "corpus"
    if not corpus.exists():
        print(f"== synthesising a demo corpus in {corpus}")
        make_corpus(corpus, 24, seconds=(4.0, 12.0), seed=0)
        make_bad_files(corpus / "broken")
    tokens = out / "tokens"
    step("tokenize", ["tokenize", corpus, "--out", tokens, "--preset", "tiny"])
    step("stats", ["stats", tokens, "--plot", out / "stats.png"])
    for stage in ("semantic", "coarse", "fine"):
        run_dir = out / "model" / stage
        if finished(run_dir, steps):
            print(f"\n== train {stage}: already trained for {steps} steps in {run_dir}")
            continue
        resume = ["--resume"] if (run_dir / "checkpoints").exists() else []
        step(f"train {stage}", ["train", stage, "--data", tokens, "--out", run_dir, "--preset", "tiny", "--steps", steps, *resume])
    wav = out / "calm_piano.wav"
    step("generate", ["generate", PROMPT, "--model", out / "model", "--seconds", seconds, "--out", wav, "--num-samples", 2, "--seed", 0])
    print(f"\ndemo done: listen to {wav} (its settings are in {wav.with_suffix('.json')})")


def main() -> None:
    ap = argparse.ArgumentParser(description="Run the whole musiclm chain offline with the tiny preset.")
    ap.add_argument("--out", type=Path, default=Path("demo"))
    ap.add_argument("--steps", type=int, default=60, help="training steps per stage")
    ap.add_argument("--seconds", type=float, default=6.0, help="seconds of audio to generate")
    args = ap.parse_args()
    run(args.out, args.steps, args.seconds)


if __name__ == "__main__":
    main()
