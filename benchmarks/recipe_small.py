"""The `small` recipe (or its `open` twin, or both side by side) end to end at full architecture sizes,
longer than the test: time per step, fit sample sizes, points per code, CLAP reconstruction errors,
what the shipped 12 x 1024 vocabulary would need, and the chain's own figures (tokens per second of
audio, stage sequence lengths, generation real-time factor).

    python benchmarks/recipe_small.py --minutes 72 --clap-codes 64       # about an hour of audio
    python benchmarks/recipe_small.py --minutes 3 --clap-codes 8 --min-points 4 --steps 1 --seconds 1   # quick
    python benchmarks/recipe_small.py --preset open --minutes 3 --clap-codes 8 --min-points 4 --steps 1 --seconds 1
    python benchmarks/recipe_small.py --preset small open --minutes 1 --clap-codes 8 --min-points 4 --semantic-codes 256 --steps 1 --batch 1 --seconds 4 --work DIR
    python benchmarks/recipe_small.py --preset small open --seconds 4 --work DIR --generate-only   # again, on DIR's runs

The backbones are the preset's checkpoints rebuilt from their real configs at random weights
(tests/pretrained.py: CLAP `laion/larger_clap_music` and MERT-v0 and Encodec 24 kHz for `small`,
w2v-BERT 2.0 and DAC 24 kHz for `open`); the stages are the preset's 6 x 1024 transformers. The
corpus is synthesised music in 60 s files, the same for every preset. Every step runs through the
command line, as a user runs it:

1. tokenize (fits the quantizers, then tokenizes the corpus) with CLAP ``levels x --clap-codes``
   codes and ``--min-points`` points per code (the shipped preset: 12 x 1024 at 50);
2. stats;
3. ``--steps`` of train for each stage;
4. ``--seconds`` of generate.

Then, in this process, the cost of one CLAP fit window, one second of semantic features and one
level of CLAP k-means at the shipped size (51,200 points, 1024 codes, 512 dims) are measured, and
the hours of audio and the fit time the shipped vocabulary needs are projected from them; and the
trained stages generate ``--seconds`` once more (after the command's run, so loading is not timed):
the generation real-time factor. With two presets, a last table puts their figures side by side
with the ratio of the second to the first, and both models then generate in this one process, in
turn, ``--repeats`` times each (the best of each is compared: one generation each, minutes apart,
is at the mercy of what else the machine does). ``--generate-only`` does only that, on the runs an
earlier call left in ``--work``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

CONFIG = """\
base = "{preset}"

[tokenize.clap]
model = "{clap}"
codebook_size = {clap_codes}

[tokenize.semantic]
model = "{semantic}"
codebook_size = {semantic_codes}

[tokenize.codec]
model = "{codec}"

[tokenize.fit]
min_points_per_code = {min_points}
semantic_seconds = {semantic_seconds}

[train]
batch_size = {batch}
warmup_steps = 1
eval_every = {steps}
eval_batches = 1
save_every = {steps}
num_workers = 0
"""


def cli(*args, log: Path) -> float:
    """Run ``musiclm ARGS``; its output goes to ``log``. Returns wall seconds; stops the benchmark on failure."""
    t0 = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.run([sys.executable, "-m", "musiclm", *map(str, args)], stdout=f, stderr=subprocess.STDOUT, env={**os.environ, "COLUMNS": "160"})
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"musiclm {args[0]} failed (exit {proc.returncode}); see {log}:\n{log.read_text()[-2000:]}")
    return wall


def write_corpus(root: Path, minutes: float, seed: int = 0) -> int:
    """``minutes`` of synthesised music in 60 s wav files at 44.1 kHz; returns the file count."""
    from musiclm.pipeline.audio_out import write_audio
    from musiclm.pipeline.synth import KINDS, synth_clip

    root.mkdir(parents=True, exist_ok=True)
    n = max(1, round(minutes))
    for i in range(n):
        seconds = min(60.0, minutes * 60 - 60 * i) if i == n - 1 else 60.0
        write_audio(root / f"track_{i:04d}.wav", synth_clip(KINDS[i % len(KINDS)], max(seconds, 1.0), 44100, seed + i), 44100)
    return n


STANDINS = {"small": {"semantic": "mert", "codec": "encodec"}, "open": {"semantic": "w2v-bert", "codec": "dac"}}


def unit_costs(folder: Path, threads: int) -> dict[str, float]:
    """Seconds per CLAP fit window, per second of semantic features, and per level of shipped-size CLAP k-means."""
    import numpy as np
    import torch

    from musiclm.pipeline.quantizers import fit_kmeans
    from musiclm.pipeline.synth import synth_clip
    from musiclm.pipeline.tokenizer import Tokenizer

    torch.set_num_threads(threads)
    tok = Tokenizer.load(folder)
    audio = {sr: synth_clip("mix", 30.0, sr, 7) for sr in tok.sample_rates}
    windows = tok.clap_windows(audio[tok.clap.sample_rate], 1.0)  # 21 windows of 10 s
    tok.clap_audio_embed(windows[:2])  # warm-up
    t0 = time.perf_counter()
    for a in range(0, len(windows), 16):
        tok.clap_audio_embed(windows[a : a + 16])
    clap = (time.perf_counter() - t0) / len(windows)
    t0 = time.perf_counter()
    tok.semantic_features(audio[tok.semantic.sample_rate])
    semantic = (time.perf_counter() - t0) / 30.0
    x = np.random.default_rng(0).standard_normal((51_200, tok.clap.embed_dim)).astype(np.float32)
    t0 = time.perf_counter()
    fit_kmeans(x, 1024, niter=20, seed=0)
    return {"clap_window": clap, "semantic_second": semantic, "kmeans_level": time.perf_counter() - t0}


def chain_figures(data: Path, runs: Path, seconds: float, threads: int) -> dict[str, float]:
    """Tokens per second of audio (every stream, every level), each stage's sequence length, and the real-time
    factor of generating ``seconds`` with the trained stages (one warm-up generation first; loading not timed)."""
    import torch

    from musiclm import MusicLM
    from musiclm.shards.format import TokenInfo
    from musiclm.training.run_folder import load_stage

    torch.set_num_threads(threads)
    info = TokenInfo.load(data)
    rec = info.raw["streams"]
    out = {
        "semantic tokens / s": float(info.semantic.frame_rate) * info.semantic.levels,
        "acoustic tokens / s": float(info.acoustic.frame_rate) * info.acoustic.levels,
        "CLAP tokens / s": rec["clap"]["levels"] / rec["clap"]["hop_seconds"],
    }
    for stage in ("semantic", "coarse", "fine"):
        out[f"{stage} sequence length"] = float(load_stage(runs / stage)[1].seq_len)
    lm = MusicLM.from_runs(runs / "semantic", runs / "coarse", runs / "fine", device="cpu")
    lm.generate("a calm piano over soft rain", seconds=min(seconds, 1.0))  # warm-up
    t0 = time.perf_counter()
    lm.generate("a calm piano over soft rain", seconds=seconds)
    out[f"generate RTF ({seconds:g} s, {threads} threads)"] = (time.perf_counter() - t0) / seconds
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", nargs="+", choices=sorted(STANDINS), default=["small"], help="one preset, or two side by side")
    ap.add_argument("--minutes", type=float, default=72.0, help="minutes of synthesised audio")
    ap.add_argument("--clap-codes", type=int, default=64)
    ap.add_argument("--semantic-codes", "--mert-codes", type=int, default=1024)
    ap.add_argument("--min-points", type=int, default=50, help="tokenize.fit.min_points_per_code")
    ap.add_argument("--semantic-seconds", "--mert-seconds", type=float, default=3600.0, help="tokenize.fit.semantic_seconds")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seconds", type=float, default=2.0, help="seconds to generate")
    ap.add_argument("--work", type=Path, default=None, help="work folder (default: a new temporary one)")
    ap.add_argument("--repeats", type=int, default=2, help="generations per preset, side by side")
    ap.add_argument("--generate-only", action="store_true", help="only the side-by-side generation, on the runs in --work")
    args = ap.parse_args()

    if args.generate_only:
        if args.work is None:
            sys.exit("--generate-only needs --work: the folder of an earlier call")
        generate_side_by_side(args.work, args.preset, args.seconds, args.repeats, threads=2)
        return
    work = args.work or Path(tempfile.mkdtemp(prefix="recipe-small-"))
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    n_files = write_corpus(work / "music", args.minutes)
    print(f"work folder {work}: {n_files} files, {args.minutes:g} min of audio ({time.perf_counter() - t0:.1f} s to synthesise)", flush=True)
    chains = {preset: run_recipe(preset, args, work) for preset in args.preset}
    if len(chains) == 2:
        (a, fa), (b, fb) = chains.items()
        print(f"\n== {a} and {b} side by side ==")
        print(f"  {'':38s} {a:>10s} {b:>10s} {b + ' / ' + a:>12s}")
        for key in fa:
            print(f"  {key:38s} {fa[key]:10.3f} {fb[key]:10.3f} {fb[key] / fa[key]:11.2f}x")
        generate_side_by_side(work, args.preset, args.seconds, args.repeats, threads=2)


def generate_side_by_side(work: Path, presets: list[str], seconds: float, repeats: int, threads: int) -> None:
    """Each preset's trained runs (``work/<preset>/runs``) generate ``seconds`` in turn, ``repeats`` times each, in
    this one process; prints each real-time factor and the ratio of the best ones to the first preset's."""
    import torch

    from musiclm import MusicLM

    torch.set_num_threads(threads)
    lms = {p: MusicLM.from_runs(*(work / p / "runs" / s for s in ("semantic", "coarse", "fine")), device="cpu") for p in presets}
    for lm in lms.values():
        lm.generate("a calm piano over soft rain", seconds=min(seconds, 1.0))  # warm-up
    rtf: dict[str, list[float]] = {p: [] for p in presets}
    for _ in range(repeats):
        for p, lm in lms.items():
            t0 = time.perf_counter()
            lm.generate("a calm piano over soft rain", seconds=seconds)
            rtf[p].append((time.perf_counter() - t0) / seconds)
    print(f"\n== generation side by side: {seconds:g} s, {threads} threads, {repeats} in turn each (real-time factor) ==")
    first = min(rtf[presets[0]])
    for p, values in rtf.items():
        print(f"  {p:8s} " + " ".join(f"{v:6.3f}" for v in values) + f"   best {min(values):6.3f}   {min(values) / first:5.2f}x")


def run_recipe(preset: str, args, root: Path) -> dict[str, float]:
    """The recipe of ``preset`` on the corpus in ``root/music``; prints its tables and returns its chain figures."""
    from tests.pretrained import StandinFolders

    from musiclm.config import load_config
    from musiclm.pipeline.fit_plan import hours_needed

    work = root / preset
    work.mkdir(parents=True, exist_ok=True)
    times: dict[str, float] = {}
    t0 = time.perf_counter()
    folders = StandinFolders(root / "backbones")
    paths = {"clap": folders["clap"].as_posix(), **{role: folders[name].as_posix() for role, name in STANDINS[preset].items()}}
    times["save stand-in backbones"] = time.perf_counter() - t0
    config = work / "recipe.toml"
    config.write_text(
        CONFIG.format(
            preset=preset, **paths, clap_codes=args.clap_codes, semantic_codes=args.semantic_codes, min_points=args.min_points,
            semantic_seconds=args.semantic_seconds, steps=args.steps, batch=args.batch,
        )
    )  # fmt: skip
    print(f"\n#### {preset}: config {config}", flush=True)

    data, runs = work / "data", work / "runs"
    times["tokenize (fit + pass)"] = cli("tokenize", root / "music", "--out", data, "--config", config, log=work / "tokenize.log")
    times["stats"] = cli("stats", data, log=work / "stats.log")
    for stage in ("semantic", "coarse", "fine"):
        times[f"train {stage} ({args.steps} steps)"] = cli("train", stage, "--data", data, "--out", runs / stage, "--config", config, "--steps", args.steps, log=work / f"train-{stage}.log")
    times[f"generate {args.seconds:g} s"] = cli("generate", "a calm piano over soft rain", "--model", runs, "--seconds", args.seconds, "--out", work / "out.wav", log=work / "generate.log")

    record = json.loads((data / "tokenizer" / "tokenizer.json").read_text())
    fit = record["fit"]
    cfg = load_config(path=config)
    print(f"\n== {preset}: time per step (wall seconds, 2 torch threads per process) ==")
    for name, seconds in times.items():
        print(f"  {name:32s} {seconds:8.1f}")
    print(f"  fit inside tokenize: features {fit['seconds_taken']['features']:.1f} s, k-means {fit['seconds_taken']['kmeans']:.1f} s")
    print("\n== fit sample ==")
    print(f"  {fit['files']} files, {fit['seconds'] / 3600:.2f} h, {fit['heldout_files']} held out ({fit['heldout_windows']} windows); CLAP hop {fit['clap_hop_seconds']:g} s")
    for name, p in fit["points"].items():
        print(f"  {name:9s} {p['points']:>8,} points for {p['codes']:>5} codes: {p['points_per_code']:.1f} per code")
    print(f"\n== CLAP {cfg.tokenize.clap.levels} x {args.clap_codes}: relative reconstruction error after each level ==")
    for name, errors in fit["clap_relative_error"].items():
        print(f"  {name:14s} " + " ".join(f"{e:.3f}" for e in errors))

    costs = unit_costs(data / "tokenizer", threads=2)
    shipped = load_config(preset).tokenize
    windows = shipped.clap.codebook_size * shipped.fit.min_points_per_code / (1 - shipped.fit.heldout_fraction)
    frames_seconds = shipped.fit.semantic_seconds
    features = windows * costs["clap_window"] + frames_seconds * costs["semantic_second"]
    # k-means costs N x K x D per iteration: semantic k-means scaled from the measured CLAP level
    rate = record["streams"]["semantic"]["frame_rate"]
    dim = json.loads((Path(paths["semantic"]) / "config.json").read_text())["hidden_size"]
    semantic_points = min(shipped.fit.max_points, shipped.fit.semantic_seconds * rate)
    kmeans = shipped.clap.levels * costs["kmeans_level"] + costs["kmeans_level"] * semantic_points * dim / (51_200 * 512)
    print(f"\n== the shipped vocabulary (CLAP 12 x 1024, semantic 1024, 50 points per code) on this machine ==")
    print(f"  measured: {costs['clap_window']:.3f} s per CLAP fit window, {costs['semantic_second']:.3f} s per second of semantic features, "
          f"{costs['kmeans_level']:.1f} s per level of CLAP k-means (51,200 x 512, 1024 codes, 20 iterations)")  # fmt: skip
    print(f"  needs {hours_needed(shipped):.1f} h of audio ({windows:,.0f} windows at a 1 s hop, held-out files included)")
    print(f"  projected fit time: {features / 3600:.2f} h of features ({windows:,.0f} windows + {frames_seconds:g} s of semantic features) + {kmeans / 60:.1f} min of k-means "
          f"(12 CLAP levels measured, semantic {semantic_points:,.0f} x {dim} scaled from them)")  # fmt: skip

    chain = chain_figures(data, runs, args.seconds, threads=2)
    print(f"\n== {preset}: the chain ==")
    for key, value in chain.items():
        print(f"  {key:38s} {value:10.3f}")
    return chain


if __name__ == "__main__":
    main()
