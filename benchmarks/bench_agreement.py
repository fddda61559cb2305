"""How often batching and lower precision change a token: share of codes that agree, per stream.

    python benchmarks/bench_agreement.py                          # tiny (fitted here) and small, synthesised audio
    python benchmarks/bench_agreement.py --audio DIR              # the same on your audio files (or NAME@RATE.npy)
    python benchmarks/bench_agreement.py --runs tiny --tokenizer DIR --audio NPY_DIR/tiny   # a GPU machine without Ray
    python benchmarks/bench_agreement.py --save-audio DIR         # also write each run's clips as DIR/RUN/NAME@RATE.npy

Clips are planned as ``musiclm tokenize`` plans them: whole files in listing order
into batches of ``tokenize.batch_seconds`` (``plan_batches``), each file cut into
``plan_segments``. Each run compares, on the same clips:

- batch-1 vs batched: ``Tokenizer.tokenize`` clip by clip against
  ``Tokenizer.tokenize_batch`` over the planned batches, both at fp32;
- bf16 vs fp32 and fp16 vs fp32: ``tokenize_batch`` under ``tokenize.precision``.

Per stream (semantic; acoustic at level 0 and at all levels; CLAP) it prints the
share of codes that agree (all codes of all clips), the mean and the worst of the
per-clip shares (the mean is what tests/test_tokenize.py checks against 0.99),
how many clips have every code equal, and the relative error of the stored
float16 CLAP embeddings (|a - b| / |b| per window). Clips whose tokenizing raised
are counted apart, with the first error. The title line counts codewords that
equal another one: their codes tie, and float noise picks which index wins.
fp16 autocast is slow on the CPU (no fp16 arithmetic there): on the CPU it takes
only the first ``--cpu-fp16-seconds`` of the first planned batch (against fp32
on the same clips).

Runs: ``tiny``, the tiny preset with a tokenizer fitted by ``run_tokenize`` on a
synthesised corpus (or ``--tokenizer DIR``), and ``small``, the small preset's
architectures at random weights (``bench_tokenize.small_random_config``) whose
quantizers (and Encodec codebooks) are fitted in this process on the clips it
measures, with the job's fit functions and no Ray. Each run goes on the CPU
(``--threads``), then on CUDA when ``torch.cuda.is_available()``.

Audio: by default the tiny run measures its fit corpus (40 files of 3-11 s in
several formats, as the tests do) and the small run synthesised music (files of
20-100 s, about ``--small-seconds`` in all; no pure tone, whose repeating frames
give the small codebooks duplicate codewords), rendered at each backbone rate with
numpy. ``--audio DIR`` measures the files under DIR instead (decoded and
resampled as the job does), or, when DIR holds ``NAME@RATE.npy`` (mono, float or
int16; one per backbone rate), those arrays. ``--seconds`` caps each run's audio
at whole files.

Without Ray: the tiny fit needs it; pass ``--tokenizer DIR`` (this script prints
the folder it fitted). Without soundfile or soxr (musiclm.pipeline.audio imports
them at module level, and the tokenizer imports that module through fit_plan),
placeholders let the imports succeed: synthesised or ``.npy`` audio then works,
decoding audio files does not. The small run's fit needs faiss.
"""

from __future__ import annotations

import argparse
import importlib.machinery
import math
import os
import sys
import tempfile
import time
import types
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

PRECISIONS = ("bf16", "fp16")  # each compared with fp32
SYNTH_KINDS = ("mix", "melody", "arpeggio", "drums")  # musiclm.pipeline.synth.KINDS that do not repeat exactly
MISSING: list[str] = []  # audio libraries replaced by placeholders


def allow_missing(*names: str) -> None:
    """A placeholder module for each of ``names`` that cannot be imported, raising on first use."""
    for name in names:
        try:
            __import__(name)
        except ImportError:
            MISSING.append(name)
            module = types.ModuleType(name)
            module.__spec__ = importlib.machinery.ModuleSpec(name, None)  # transformers probes packages with find_spec

            def fail(attr: str, name=name):
                if attr.startswith("__"):
                    raise AttributeError(attr)  # hasattr() probes, e.g. by inspect
                raise ImportError(f"{name} is not installed here: decode audio elsewhere and pass --audio DIR of NAME@RATE.npy")

            module.__getattr__ = fail
            sys.modules[name] = module


allow_missing("soundfile", "soxr")


# ---- audio --------------------------------------------------------------------------------------
@dataclass
class Corpus:
    """Files in the job's listing order, ``(name, seconds)``, and how to read a segment of one."""

    what: str
    files: list[tuple[str, float]]
    arrays: dict[str, dict[int, np.ndarray]] | None = None  # name -> {rate: mono}; None: decode files under root
    root: Path | None = None

    def segment(self, name: str, start: float, seconds: float, rates: tuple[int, ...]) -> dict[int, np.ndarray]:
        if self.arrays is None:
            from musiclm.pipeline.audio import load_for_rates

            return load_for_rates(self.root / name, start, seconds, rates)
        have = self.arrays[name]
        missing = [r for r in rates if r not in have]
        if missing:
            raise ValueError(f"{name}: no audio at {missing} Hz; give NAME@RATE.npy for every rate of {rates}")
        return {r: have[r][round(start * r) : round(start * r) + round(seconds * r)] for r in rates}

    def capped(self, seconds: float | None) -> Corpus:
        """Whole files, in order, until ``seconds`` of audio."""
        if seconds is None:
            return self
        keep, total = [], 0.0
        for name, s in self.files:
            if total >= seconds:
                break
            keep.append((name, s))
            total += s
        return self if len(keep) == len(self.files) else replace(self, files=keep, what=f"the first {len(keep)} of {self.what}")

    def save(self, folder: Path, rates: tuple[int, ...]) -> None:
        """Every file as ``NAME@RATE.npy`` (int16) at ``rates``, for --audio on another machine."""
        folder.mkdir(parents=True, exist_ok=True)
        for name, seconds in self.files:
            for rate, x in self.segment(name, 0.0, seconds, rates).items():
                np.save(folder / f"{name.replace('/', '__')}@{rate}.npy", np.round(np.clip(x, -1, 1) * 32767).astype(np.int16))


def file_corpus(root: Path) -> Corpus:
    """Audio files under ``root``, probed as the job probes them; files it would refuse are left out (and told)."""
    from musiclm.pipeline.audio import AudioError, audio_files_in, probe

    files, refused = [], []
    for path in audio_files_in(root, "--audio"):
        rel = path.relative_to(root).as_posix()
        try:
            files.append((rel, probe(path).duration))
        except AudioError as e:
            refused.append(f"{rel} ({e.reason})")
    if refused:
        print(f"{len(refused)} of {len(refused) + len(files)} files under {root} are refused by musiclm's probe and left out: {'; '.join(refused)}")
    return Corpus(f"{len(files)} files under {root}", files, root=root)


def npy_corpus(root: Path) -> Corpus:
    arrays: dict[str, dict[int, np.ndarray]] = {}
    for path in sorted(root.glob("*@*.npy")):
        name, rate = path.stem.rsplit("@", 1)
        x = np.load(path)
        arrays.setdefault(name, {})[int(rate)] = x.astype(np.float32) / 32768 if x.dtype == np.int16 else x.astype(np.float32)
    files = [(name, min(len(x) / r for r, x in rates.items())) for name, rates in arrays.items()]
    return Corpus(f"{len(files)} .npy files under {root}", files, arrays=arrays)


def synth_corpus(total_seconds: float, rates: tuple[int, ...], seed: int = 0) -> Corpus:
    """Synthesised music (numpy only), files of 20-100 s, rendered at each rate (no resampling).

    No pure tone (nor the sustained chord and rain kinds): a tone's frames repeat exactly, so the
    small codebooks fitted on it hold duplicate codewords whose ties float noise breaks (the
    indices differ, the vectors do not)."""
    from musiclm.pipeline.synth import synth_clip

    rng = np.random.default_rng(seed)
    arrays, files, total = {}, [], 0.0
    while total < total_seconds:
        i = len(files)
        seconds = float(np.round(rng.uniform(20.0, 100.0), 2))
        name = f"synth_{i:03d}"
        arrays[name] = {r: synth_clip(SYNTH_KINDS[i % len(SYNTH_KINDS)], seconds, r, seed + i) for r in rates}
        files.append((name, seconds))
        total += seconds
    return Corpus(f"{len(files)} synthesised files", files, arrays=arrays)


@dataclass
class Planned:
    batches: list[list[dict[int, np.ndarray]]]  # the clips of each planned batch
    seconds: float

    @property
    def clips(self) -> list[dict[int, np.ndarray]]:
        return [c for b in self.batches for c in b]


def first_seconds(planned: Planned, seconds: float) -> Planned:
    """The first ``seconds`` of the first planned batch, as one batch (the last clip cut short)."""
    clips, total = [], 0.0
    for clip in planned.batches[0]:
        rate = min(clip)
        take = min(len(clip[rate]) / rate, seconds - total)
        clips.append({r: x[: round(take * r)] for r, x in clip.items()})
        total += take
        if total >= seconds:
            break
    return Planned([clips], total)


def plan(corpus: Corpus, batch_seconds: float, segment_seconds: float, rates: tuple[int, ...]) -> Planned:
    """The clips of ``corpus`` in the job's batches: ``plan_batches`` of whole files, ``plan_segments`` of each."""
    from musiclm.pipeline.audio import plan_segments
    from musiclm.pipeline.batch_plan import plan_batches

    batches = []
    for _, members in plan_batches(corpus.files, batch_seconds):
        batches.append([corpus.segment(name, start, length, rates) for name, seconds in members for start, length in plan_segments(seconds, segment_seconds)])
    return Planned(batches, sum(s for _, s in corpus.files))


# ---- tokenizers ------------------------------------------------------------------------------
def tiny_tokenizer(work: Path, given: Path | None) -> tuple[Path, Corpus | None]:
    """A tiny tokenizer folder: ``given``, or fitted by the job on a synthesised corpus (returned too)."""
    if given is not None:
        return given, None
    try:
        import ray  # noqa: F401
    except ImportError:
        raise SystemExit("fitting the tiny tokenizer needs Ray (musiclm tokenize): pass --tokenizer DIR fitted elsewhere") from None
    from musiclm.config import load_config
    from musiclm.pipeline.synth_corpus import make_corpus
    from musiclm.pipeline.tokenize_job import run_tokenize

    corpus = work / "tiny_corpus"
    make_corpus(corpus, 40, seconds=(3.0, 11.0), seed=0)  # the good files of tests/conftest.py's corpus
    run_tokenize(corpus, work / "tiny_tokens", load_config("tiny"))
    print(f"tiny tokenizer: {work / 'tiny_tokens' / 'tokenizer'} (pass it as --tokenizer to skip the fit)")
    return work / "tiny_tokens" / "tokenizer", file_corpus(corpus)


def fit_in_process(tok, clips: list[dict[int, np.ndarray]]) -> None:
    """Fit ``tok``'s quantizers (and random Encodec codebooks) on ``clips``, as the job's fit does, without Ray."""
    from musiclm.models.codec import set_encodec_codebooks
    from musiclm.pipeline.quantizers import fit_encodec_codebooks, fit_residual, fit_semantic

    fit = tok.cfg.fit
    max_frames = max(1, math.ceil(fit.max_points / len(clips)))
    feats = [tok.fit_features(c, max_frames, np.random.default_rng([fit.seed, i])) for i, c in enumerate(clips)]
    centroids, norm = fit_semantic(np.concatenate([f["mert"] for f in feats]), tok.cfg.semantic.codebook_size, niter=fit.niter, seed=fit.seed)
    books = fit_residual(np.concatenate([f["clap"] for f in feats]), tok.cfg.clap.levels, tok.cfg.clap.codebook_size, niter=fit.niter, seed=fit.seed)
    if "encodec" in feats[0]:
        latents = np.concatenate([f["encodec"] for f in feats])
        set_encodec_codebooks(tok.codec, fit_encodec_codebooks(tok.codec, latents, niter=fit.niter, seed=fit.seed))
    tok.quantizers = {"semantic_centroids": centroids, "semantic_norm": norm, "clap_codebooks": books}


def on_device(tok, device: str, precision: str = "fp32"):
    """The same backbones and quantizers on ``device`` at ``precision`` (the backbones move with it)."""
    from musiclm.pipeline.tokenizer import Tokenizer

    return Tokenizer(replace(tok.cfg, precision=precision), tok.clap, tok.semantic, tok.codec, tok.quantizers, device=device, record=tok.record)


# ---- measuring --------------------------------------------------------------------------------
def run_tokens(tok, planned: Planned, batched: bool) -> tuple[list, float]:
    """Tokens of every clip (or the exception it raised) and the seconds they took."""

    def alone(clip):
        try:
            return tok.tokenize(clip)
        except Exception as e:  # noqa: BLE001 - counted and reported, the others go on
            return e

    t0 = time.perf_counter()
    if batched:
        out = [r for b in planned.batches for r in tok.tokenize_batch(b)]
    else:
        out = [alone(c) for c in planned.clips]
    if tok.device.type == "cuda":
        torch.cuda.synchronize()
    return out, time.perf_counter() - t0


STREAMS = {
    "semantic": ("semantic", lambda a: a),
    "acoustic level 0": ("acoustic", lambda a: a[:1]),
    "acoustic all": ("acoustic", lambda a: a),
    "clap": ("clap", lambda a: a),
}


def compare(a: list, b: list) -> tuple[dict[str, dict], str]:
    """Per stream: codes, pooled and per-clip agreement, identical clips; CLAP embedding error; failures."""
    pairs = [(x, y) for x, y in zip(a, b) if not isinstance(x, Exception) and not isinstance(y, Exception)]
    errors = [r for r in (*a, *b) if isinstance(r, Exception)]
    failed = f"{len(a) - len(pairs)} clips failed, first: {type(errors[0]).__name__}: {str(errors[0]).splitlines()[0][:120]}" if errors else ""
    rows = {}
    for label, (key, pick) in STREAMS.items():
        same = [pick(x[key]) == pick(y[key]) for x, y in pairs]
        rows[label] = {
            "codes": sum(s.size for s in same),
            "agree": sum(int(s.sum()) for s in same) / max(1, sum(s.size for s in same)),
            "mean": float(np.mean([s.mean() for s in same])) if same else float("nan"),
            "worst": float(np.min([s.mean() for s in same])) if same else float("nan"),
            "identical": sum(bool(s.all()) for s in same),
            "clips": len(same),
        }
    if pairs:
        ea = np.concatenate([x["clap_emb"] for x, _ in pairs]).astype(np.float32)
        eb = np.concatenate([y["clap_emb"] for _, y in pairs]).astype(np.float32)
        rel = np.linalg.norm(ea - eb, axis=1) / np.maximum(np.linalg.norm(eb, axis=1), 1e-12)
        rows["clap"]["emb"] = (float(rel.mean()), float(rel.max()))
    return rows, failed


def print_table(title: str, comparisons: dict[str, tuple[dict, str]], times: dict[str, tuple[float, float]]) -> None:
    print()
    print(title)
    head = f"{'comparison':<24} {'stream':<17} {'codes':>9} {'agree':>9} {'clip mean':>9} {'worst':>9} {'identical':>10}   CLAP emb rel. err mean / max"
    print(head)
    print("-" * len(head))
    for name, (rows, failed) in comparisons.items():
        for i, (stream, r) in enumerate(rows.items()):
            emb = "   {:.1e} / {:.1e}".format(*r["emb"]) if "emb" in r else ""
            print(
                f"{name if i == 0 else '':<24} {stream:<17} {r['codes']:>9,} {r['agree']:>9.4%} {r['mean']:>9.4%} {r['worst']:>9.4%} "
                f"{r['identical']:>4}/{r['clips']:<5}{emb}"
            )
        if failed:
            print(f"{'':<24} {failed}")
    print("time: " + ", ".join(f"{k} {t:.1f} s ({seconds / t:.1f} audio-s/s)" for k, (t, seconds) in times.items()))


def duplicate_codewords(tok) -> str:
    """How many codewords equal an earlier one: their codes tie, and float noise picks one."""

    def dup(book) -> str:
        book = np.asarray(book)
        return f"{len(book) - len(np.unique(book, axis=0))}/{len(book)}"

    q = tok.quantizers
    encodec = tok.codec.model.quantizer.layers[0].codebook.embed.cpu().numpy()
    return f"codewords equal to another: semantic {dup(q['semantic_centroids'])}, Encodec level 0 {dup(encodec)}, CLAP level 0 {dup(q['clap_codebooks'][0])}"


def measure(label: str, tok, corpus: Corpus, device: str, cpu_fp16_seconds: float | None) -> None:
    """One table: batch-1 vs batched at fp32, and each precision vs fp32, on ``device``.

    fp16 autocast on the CPU is slow (no fp16 arithmetic on most CPUs): there it takes the first
    ``cpu_fp16_seconds`` of the first planned batch, against fp32 on the same clips."""
    tok = on_device(tok, device)
    planned = plan(corpus, tok.cfg.batch_seconds, tok.cfg.audio.segment_seconds, tok.sample_rates)
    tok.tokenize(planned.clips[0])  # warm-up
    fp32, t_batched = run_tokens(tok, planned, batched=True)
    single, t_single = run_tokens(tok, planned, batched=False)
    comparisons = {"batch-1 vs batched fp32": compare(single, fp32)}
    times = {"batched fp32": (t_batched, planned.seconds), "batch-1 fp32": (t_single, planned.seconds)}
    for p in PRECISIONS:
        part, ref, name = planned, fp32, f"{p} vs fp32 (batched)"
        if p == "fp16" and device == "cpu" and cpu_fp16_seconds and planned.seconds > cpu_fp16_seconds:
            part = first_seconds(planned, cpu_fp16_seconds)
            ref, _ = run_tokens(tok, part, batched=True)
            name = f"fp16 vs fp32, {part.seconds:.0f} s"
        low, t = run_tokens(on_device(tok, device, p), part, batched=True)
        comparisons[name] = compare(low, ref)
        times[f"batched {p}"] = (t, part.seconds)
    where = f"cpu, {torch.get_num_threads()} threads" if device == "cpu" else torch.cuda.get_device_name()
    sizes = [len(b) for b in planned.batches]
    title = (
        f"{label} on {where}: {corpus.what}, {planned.seconds / 60:.1f} min of audio, {len(planned.clips)} segments of at most "
        f"{tok.cfg.audio.segment_seconds:g} s in {len(planned.batches)} planned batches of {min(sizes)}-{max(sizes)} "
        f"(tokenize.batch_seconds = {tok.cfg.batch_seconds:g}); {duplicate_codewords(tok)}"
    )
    print_table(title, comparisons, times)


def devices() -> list[str]:
    return ["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"]


def run_tiny(args, work: Path, audio: Corpus | None) -> None:
    from musiclm.pipeline.tokenizer import Tokenizer

    folder, fit_corpus = tiny_tokenizer(work, args.tokenizer)
    corpus = audio or fit_corpus
    if corpus is None:
        raise SystemExit("--tokenizer without --audio: give the audio to measure")
    tok = Tokenizer.load(folder)
    corpus = corpus.capped(args.seconds)
    if args.save_audio is not None:
        corpus.save(args.save_audio / "tiny", tok.sample_rates)
    for device in devices():
        measure("tiny", tok, corpus, device, args.cpu_fp16_seconds)


def run_small(args, work: Path, audio: Corpus | None) -> None:
    from bench_tokenize import small_random_config

    from musiclm.pipeline.tokenizer import Tokenizer

    tok = Tokenizer.from_config(small_random_config(args.clap_codes).tokenize)
    corpus = (audio or synth_corpus(args.small_seconds, tok.sample_rates)).capped(args.seconds or args.small_seconds)
    if args.save_audio is not None:
        corpus.save(args.save_audio / "small", tok.sample_rates)
    planned = plan(corpus, tok.cfg.batch_seconds, tok.cfg.audio.segment_seconds, tok.sample_rates)
    t0 = time.perf_counter()
    fit_in_process(tok, planned.clips)
    print(f"small: quantizers and Encodec codebooks fitted in {time.perf_counter() - t0:.0f} s on the {len(planned.clips)} segments measured", flush=True)
    for device in devices():
        measure("small (random weights)", tok, corpus, device, args.cpu_fp16_seconds)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", nargs="+", choices=["tiny", "small"], default=["tiny", "small"])
    ap.add_argument("--tokenizer", type=Path, help="tiny: a fitted tokenizer folder (skips the fit, which needs Ray)")
    ap.add_argument("--audio", type=Path, help="audio files to measure, or a folder of NAME@RATE.npy")
    ap.add_argument("--seconds", type=float, help="at most this much audio per run (whole files)")
    ap.add_argument("--small-seconds", type=float, default=150.0, help="small: synthesised audio (and the cap on --audio)")
    ap.add_argument("--clap-codes", type=int, default=16, help="small: CLAP codebook size (a few minutes of audio cannot fit 1024)")
    ap.add_argument("--cpu-fp16-seconds", type=float, default=15.0, help="fp16 on the CPU: this much audio (0: all); it is slow there")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    ap.add_argument("--save-audio", type=Path, help="write each run's audio as DIR/RUN/NAME@RATE.npy (int16), for --audio on another machine")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if MISSING:
        print(f"not installed: {', '.join(MISSING)} (placeholders: audio files cannot be decoded here)")
    work = Path(tempfile.mkdtemp(prefix="bench-agreement-"))
    audio = None
    if args.audio is not None:
        audio = npy_corpus(args.audio) if any(args.audio.glob("*@*.npy")) else file_corpus(args.audio)
    for run in args.runs:
        t0 = time.perf_counter()
        try:
            (run_tiny if run == "tiny" else run_small)(args, work, audio)
        except Exception as e:  # noqa: BLE001 - report the run that failed, go on with the next
            print(f"{run}: failed: {type(e).__name__}: {e}")
        print(f"({run}: {time.perf_counter() - t0:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
