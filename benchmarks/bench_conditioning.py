"""Do the stages follow their conditioning? ``index`` against ``time`` positions, side by side, per stage.

    python benchmarks/bench_conditioning.py                       # known-answer corpora (tests/known_answer.py)
    python benchmarks/bench_conditioning.py --windows test --max-steps 1600 --eval-every 50   # the tests' windows
    python benchmarks/bench_conditioning.py --real DIR --real-val VAL --real-steps 800   # + real-music tokens

Everything runs at the ``tiny`` size on the CPU, offline. A tiny tokenizer is built in memory (random
backbones and quantizers: only its token vocabularies and rates matter here) and saved, and the three
known-answer corpora of ``tests/known_answer.py`` are written with it. For each positions kind, each
stage trains for ``--max-steps`` (evaluating the held-out loss every ``--eval-every``), and prints:

1. **steps to 0.01 nats above the floor**: the first evaluation whose held-out loss is within 0.01 of the
   least loss the corpus allows (``never`` within the budget). The floor is 0 for coarse and fine; the
   semantic stage cannot know which code of its style a window starts on, ln(8) nats once per window, so
   its floor is ln(8) / 200 = 0.0104 nats per token at a 4 s window. Then the held-out loss and teacher-forced accuracy after the test's own step budget
   (``known_answer.STEPS``) and after ``--max-steps``;
2. **swapped conditioning**: teacher-forced accuracy with another clip's conditioning (of another style),
   and what that costs;
3. **the generated chain**: ``--samples`` samples of ``--seconds`` through :class:`MusicLM` given CLAP
   tokens: the share of frames where semantic follows CLAP (and its own rule), coarse follows the
   generated semantic, fine follows the generated coarse; frames within 2 frames of a window start of the
   stage that made them ("borders") and the others ("inside") apart.

With ``--real DIR --real-val VAL`` (tokenized folders of real music, e.g. the Debian game-music packages
tokenized with ``--preset tiny``), each stage also trains ``--real-steps`` on DIR both ways and the held-out
loss on VAL is printed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from bench_train_vs_onthefly import random_quantizers  # noqa: E402

from musiclm.config import STAGES, load_config  # noqa: E402
from musiclm.generation import MusicLM  # noqa: E402
from musiclm.pipeline.tokenizer import Tokenizer  # noqa: E402
from musiclm.training.run_folder import load_stage  # noqa: E402
from musiclm.training.trainer import run_train  # noqa: E402
from tests import known_answer as ka  # noqa: E402

KINDS = ("index", "time")
BORDER = 2  # frames on each side of a window start counted as its border


def tiny_tokenizer(folder: Path) -> Path:
    """A tiny tokenizer saved at ``folder``: random backbones, random quantizer arrays."""
    tok = Tokenizer.from_config(load_config("tiny").tokenize)
    tok.quantizers = random_quantizers(tok)
    tok.save(folder)
    return folder


def config(positions: str, windows: str):
    """The tiny preset with ``positions``, at its own windows or at the tests' (``known_answer.WINDOWS``)."""
    if windows == "test":
        return ka.known_answer_config(positions)
    cfg = load_config("tiny")
    return replace(cfg, model=replace(cfg.model, positions=positions))


def val_curve(run: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["val/loss"]) for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "val/loss" in r]


def train(stage: str, data: Path, val: Path, run: Path, cfg, steps: int, eval_every: int) -> float:
    t0 = time.perf_counter()
    run_train(stage, data, run, cfg, steps=steps, val_data=val, eval_every=eval_every, save_every=10**9, device="cpu")
    return time.perf_counter() - t0


def held_out(run: Path, samples: list) -> dict[str, float]:
    model, layout, _, _ = load_stage(run, device="cpu")
    wins = ka.windows(layout, samples)
    others = [ka.swapped(layout, w, wins[(i + 21) % len(wins)]) for i, w in enumerate(wins)]
    acc, loss, _ = ka.teacher_forced(model, layout, wins)
    swapped = ka.teacher_forced(model, layout, others)[0]
    return {"acc": acc, "loss": loss, "swapped": swapped}


def chain_agreement(runs: dict[str, Path], val: list, seconds: float, samples: int) -> dict[str, dict[str, float]]:
    """Share of frames following each relation over ``samples`` generations, at window borders and inside."""
    lm = MusicLM.from_runs(runs["semantic"], runs["coarse"], runs["fine"], device="cpu", precision="fp32")
    counts: dict[str, dict[str, list[int]]] = {r: {"border": [0, 0], "inside": [0, 0]} for r in ("semantic", "coarse", "fine")}
    for i in range(samples):
        clap = next(s.clap[0] for s in val if ka.style_of_clap(s.clap[0]) == i % ka.STYLES).astype(np.int64)
        g = lm.generate_with_details(None, seconds, clap_tokens=clap, seed=i)
        ok = ka.agreement(lm.info, g.semantic[0], g.acoustic[0], clap)
        for relation, stage in (("semantic", "semantic"), ("coarse", "coarse"), ("fine", "fine")):
            border = np.zeros(len(ok[relation]), dtype=bool)
            for w in g.windows:
                if w.stage == stage and w.start > 0:
                    border[max(w.known - BORDER, 0) : w.known + BORDER] = True
            for where, sel in (("border", border), ("inside", ~border)):
                counts[relation][where][0] += int(ok[relation][sel].sum())
                counts[relation][where][1] += int(sel.sum())
    return {r: {w: (a / n if n else float("nan")) for w, (a, n) in c.items()} for r, c in counts.items()}


def floor(stage: str, run: Path) -> float:
    """The least mean loss (nats per target token) a stage can reach on its known-answer corpus."""
    if stage != "semantic":
        return 0.0
    _, layout, _, _ = load_stage(run, device="cpu")
    return float(np.log(8) / layout.target.length)  # the first frame: one of its style's 8 codes


def first_below(curve: list[tuple[int, float]], level: float) -> str:
    return next((str(step) for step, loss in curve if loss < level), "never")


def at_step(curve: list[tuple[int, float]], step: int) -> float:
    return min((abs(s - step), loss) for s, loss in curve)[1]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--max-steps", type=int, default=1600)
    ap.add_argument("--eval-every", type=int, default=50)
    ap.add_argument("--seconds", type=float, default=12.0)
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--clips", type=int, default=48)
    ap.add_argument("--windows", choices=("preset", "test"), default="preset",
                    help="stage windows: the tiny preset's (coarse 2 s, fine 1 s) or the shorter ones the tests train on")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--work", type=Path, default=None, help="keep the corpora and runs here (default: a temporary folder)")
    ap.add_argument("--real", type=Path, default=None, help="a tokenized folder of real music (tiny preset)")
    ap.add_argument("--real-val", type=Path, default=None, help="its held-out folder (same tokenizer)")
    ap.add_argument("--real-steps", type=int, default=800)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    work = args.work or Path(tempfile.mkdtemp(prefix="bench_conditioning-"))
    work.mkdir(parents=True, exist_ok=True)
    tok = tiny_tokenizer(work / "tokenizer") if not (work / "tokenizer").is_dir() else work / "tokenizer"

    rows, runs, curves, times = {}, {k: {} for k in KINDS}, {}, {}
    vals = {}
    for stage in STAGES:
        data, val = work / f"{stage}-data", work / f"{stage}-val"
        for folder, n, seed in ((data, args.clips, 0), (val, 16, 1)):
            if not folder.is_dir():
                ka.write_known_corpus(folder, tok, stage, n_clips=n, seed=seed)
        vals[stage] = ka.read_samples(val)
        for kind in KINDS:
            run = work / "runs" / kind / stage
            if not (run / "metrics.jsonl").is_file():
                shutil.rmtree(run, ignore_errors=True)
                times[kind, stage] = train(stage, data, val, run, config(kind, args.windows), args.max_steps, args.eval_every)
            runs[kind][stage] = run
            curves[kind, stage] = val_curve(run)
            rows[kind, stage] = held_out(run, vals[stage])
            print(f"trained {stage} with {kind} positions: {rows[kind, stage]}", flush=True)

    print(f"\nheld-out loss (nats) and accuracy, index vs time; tiny, {args.windows} windows, {args.max_steps} steps, eval every {args.eval_every}")
    print(f"{'stage':9} {'positions':9} {'floor':>6} {'steps to floor+0.01':>19} {'loss @test budget':>18} {'loss @end':>10} {'acc @end':>9} {'swapped acc':>12} {'swap cost':>10}")
    for stage in STAGES:
        least = floor(stage, runs["time"][stage])
        for kind in KINDS:
            r, c = rows[kind, stage], curves[kind, stage]
            print(
                f"{stage:9} {kind:9} {least:>6.4f} {first_below(c, least + 0.01):>19} {at_step(c, ka.STEPS[stage]):>11.4f} @{ka.STEPS[stage]:<5} "
                f"{c[-1][1]:>10.4f} {r['acc']:>9.4f} {r['swapped']:>12.4f} {r['acc'] - r['swapped']:>10.4f}"
            )
    print(f"\ngenerated chain: share of frames following each relation ({args.samples} x {args.seconds:g} s, fp32, KV cache)")
    print(f"{'positions':9} {'relation':22} {'inside windows':>15} {'window borders':>15}")
    for kind in KINDS:
        agree = chain_agreement(runs[kind], vals["semantic"], args.seconds, args.samples)
        for relation, label in (("semantic", "semantic <- CLAP"), ("coarse", "coarse <- semantic"), ("fine", "fine <- coarse")):
            a = agree[relation]
            print(f"{kind:9} {label:22} {a['inside']:>15.4f} {a['border']:>15.4f}")

    if args.real is not None:
        if args.real_val is None:
            raise SystemExit("--real needs --real-val (held-out tokens of the same tokenizer)")
        print(f"\nreal-music tokens: held-out loss after {args.real_steps} steps (tiny)")
        print(f"{'stage':9} {'index':>8} {'time':>8} {'time/index':>11}")
        for stage in STAGES:
            loss = {}
            for kind in KINDS:
                run = work / "real" / kind / stage
                if not (run / "metrics.jsonl").is_file():
                    shutil.rmtree(run, ignore_errors=True)
                    cfg = replace(load_config("tiny"), model=replace(load_config("tiny").model, positions=kind))
                    train(stage, args.real, args.real_val, run, cfg, args.real_steps, args.real_steps)
                loss[kind] = val_curve(run)[-1][1]
            print(f"{stage:9} {loss['index']:>8.4f} {loss['time']:>8.4f} {loss['time'] / loss['index']:>11.3f}")


if __name__ == "__main__":
    main()
