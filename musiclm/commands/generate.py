"""``musiclm generate``: the command's glue around :class:`~musiclm.generation.MusicLM`.

Checks every argument before a model is loaded, writes the kept samples (WAV or
FLAC files plus a JSON sidecar of settings, scores and timings), streams with
``--stream`` (chunks written as they are made) and writes a WAV stream to stdout
with ``--out -`` for a player to read from a pipe; all messages then go to stderr.

:func:`run_generate` reads top to bottom: check, find the stages, load, generate
and write the audio, then the sidecar and the summary (and an ``--audit``).

Layer: commands (imports the generation layer, ``hub.model_folder``, and lazily ``models.precision``, ``pipeline.audio`` and
:mod:`musiclm.commands.audit` for ``--audit``).
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

from musiclm.errors import UserError
from musiclm.generation.model import MusicLM
from musiclm.generation.request import SamplingRequest, check_prompt_audio, check_request, conditioning_prompts
from musiclm.generation.run import Generation, Progress
from musiclm.generation.stages import temperatures
from musiclm.hub.model_folder import chosen_stages, own_tokenizer
from musiclm.version import __version__

FORMATS = ("wav", "flac")
STDOUT = "-"


@dataclass(frozen=True)
class Output:
    """Where ``musiclm generate`` writes: ``out`` (a file name, or ``-`` for a WAV stream on stdout), the
    format ``fmt`` (None: from the suffix), streamed as made or not, and the corpus to ``audit`` against."""

    out: str | Path = "out.wav"
    fmt: str | None = None
    stream: bool = False
    audit: str | Path | None = None

    @property
    def to_stdout(self) -> bool:
        return str(self.out) == STDOUT


def output_paths(out: str | Path, fmt: str | None, keep: int) -> tuple[list[Path], Path, str]:
    """Audio files (FILE.wav, or FILE-0.wav, FILE-1.wav ... for keep > 1), the sidecar FILE.json and the format.

    The format is ``fmt``, else the suffix of ``out`` (.wav or .flac), else wav.
    """
    out = Path(out)
    suffix = out.suffix.lower().lstrip(".")
    if fmt is None:
        if suffix and suffix not in FORMATS:
            raise UserError(f"cannot write {out}: musiclm writes .wav or .flac (or pass --format wav|flac)")
        fmt = suffix or "wav"
    fmt = fmt.lower()
    if fmt not in FORMATS:
        raise UserError(f"--format must be wav or flac, got '{fmt}'")
    base = out.with_suffix("") if suffix in FORMATS else out
    files = [base.with_name(f"{base.name}.{fmt}")] if keep == 1 else [base.with_name(f"{base.name}-{i}.{fmt}") for i in range(keep)]
    return files, base.with_name(f"{base.name}.json"), fmt


def run_generate(
    request: SamplingRequest,
    output: Output,
    *,
    model: str | Path | None = None,
    semantic: str | Path | None = None,
    coarse: str | Path | None = None,
    fine: str | Path | None = None,
    device: str | None = None,
    precision: str | None = None,
    revision: str | None = None,
    trust_remote_code: bool = False,
) -> list[Path]:
    """``musiclm generate``: write the kept samples of ``request`` as audio files plus a JSON sidecar; returns
    the audio paths (none for ``out="-"``, a WAV stream on stdout).

    The command conditions on text prompts or a style audio. Stage run folders come from
    ``--semantic/--coarse/--fine``, else ``model``/<stage>; ``model`` may be a hub repo id (pulled at
    ``revision``, see :func:`musiclm.hub.pull.resolve_model`). Every argument is checked before a model is loaded.
    """
    check_arguments(request, output, precision)
    runs, tokenizer = find_stages(request, model, semantic, coarse, fine, revision, trust_remote_code)
    say = _Say(output.to_stdout)
    t0 = time.perf_counter()
    lm = MusicLM.from_runs(runs["semantic"], runs["coarse"], runs["fine"], tokenizer=tokenizer, device=device, precision=precision)
    load_s = time.perf_counter() - t0
    g, files = generate_and_write(lm, request, output)
    record = sidecar_record(lm, request, output, g, files, load_s)
    report(lm, output, g, files, record, say)
    return files


def check_arguments(request: SamplingRequest, output: Output, precision: str | None) -> None:
    """Every argument that can be checked without a model: a one-line :class:`UserError` for the first bad one."""
    from musiclm.models.precision import check_precision

    r = request
    prompts = conditioning_prompts(r.prompt, None, r.style_audio)  # checks a style audio is readable
    check_request(prompts, r.seconds, r.num_samples, r.keep, r.every, r.top_k, r.top_p, r.cfg_scale, stream=output.stream)
    if output.to_stdout and ((r.keep or 1) > 1 or output.fmt not in (None, "wav")):
        raise UserError("--out - writes one WAV stream to stdout: drop --keep above 1 and --format flac, or write to a file")
    temperatures(r.temperature)
    if precision is not None:
        check_precision(precision)
    if not output.to_stdout:
        output_paths(output.out, output.fmt, 1)  # the format, before any work
    if r.prompt_audio is not None:
        check_prompt_audio(r.prompt_audio)
    if output.audit is not None:
        if output.to_stdout:
            raise UserError("--audit reads the files generate writes: write to a file instead of --out -")
        from musiclm.commands.audit import check_audit_target

        check_audit_target(output.audit, r.seconds)


def find_stages(
    request: SamplingRequest,
    model: str | Path | None,
    semantic: str | Path | None,
    coarse: str | Path | None,
    fine: str | Path | None,
    revision: str | None,
    trust_remote_code: bool,
) -> tuple[dict[str, Path | None], Path | None]:
    """The stage run folders (fine None with ``coarse_only``) and the model folder's tokenizer/ (or None);
    a hub ``model`` is pulled first."""
    if model is not None:
        from musiclm.hub.pull import resolve_model

        model = resolve_model(model, revision=revision, trust_remote_code=trust_remote_code)
    elif revision is not None:
        raise UserError("--revision pins a hub model: give it with --model OWNER/NAME")
    runs = chosen_stages(model, {"semantic": semantic, "coarse": coarse, "fine": fine}, request.coarse_only)
    return runs, (own_tokenizer(Path(model)) if model is not None else None)


def generate_and_write(lm: MusicLM, request: SamplingRequest, output: Output) -> tuple[Generation, list[Path]]:
    """Run ``request`` with a progress bar and write its kept samples: streamed (one sample, each chunk as it
    is made) or whole; returns the generation and the audio files (none on stdout)."""
    samples = lm.stages["coarse"].layout.frames_of("acoustic", request.seconds) * lm.hop
    with _ProgressDisplay() as progress:
        if output.stream:
            run = lm.run(replace(request, num_samples=1, keep=1, use_cache=True), progress=progress, stream=True)  # one sample
            with _AudioSink(output.out, output.fmt, lm.sample_rate, samples) as sink:
                for chunk in run:
                    sink(chunk)
            return run.generation, ([] if output.to_stdout else output_paths(output.out, output.fmt, 1)[0])
        run = lm.run(request, progress=progress)
        for _ in run:
            pass
        g = run.generation
    if output.to_stdout:
        with _AudioSink(output.out, output.fmt, lm.sample_rate, samples) as sink:
            sink(g.audio[0])
        return g, []
    from musiclm.pipeline.audio_out import write_audio

    files, _, kind = output_paths(output.out, output.fmt, len(g.kept))
    for path, audio in zip(files, g.audio):
        write_audio(path, audio, g.sample_rate, kind)
    return g, files


def sidecar_record(lm: MusicLM, request: SamplingRequest, output: Output, g: Generation, files: list[Path], load_s: float) -> dict:
    """What the JSON sidecar records: the request, the model, every sample's score, each stage's settings and
    windows, the prompt audio's part, and the timings."""
    samples = g.audio.shape[1]
    return {
        "musiclm": __version__,
        "prompts": g.prompts,
        "every": g.every,
        "seconds": request.seconds,
        "seed": request.seed,
        "num_samples": len(g.scores),
        "keep": len(g.kept),
        "coarse_only": request.coarse_only,
        "use_cache": request.use_cache,
        "streamed": output.stream,
        "device": str(lm.device),
        "precision": lm.precision,
        "cuda_graphs": lm.cuda_graphs,
        "sample_rate": g.sample_rate,
        "samples": samples,
        "acoustic_frames": samples // lm.hop,
        "outputs": [{"file": str(p), "sample": i, "clap_score": float(g.scores[i])} for p, i in zip(files or [STDOUT], g.kept)],
        "clap_scores": [float(s) for s in g.scores],
        "stages": {
            name: {
                "run": str(lm.stages[name].run) if lm.stages[name].run else None,
                **vars(s),
                "windows": sum(w.stage == name for w in g.windows),
                "window_seconds": lm.stages[name].layout.window_seconds,
            }
            for name, s in g.settings.items()
        },
        "tokenizer": {"fingerprint": lm.info.fingerprint, "path": str(lm.tokenizer_path) if lm.tokenizer_path else None},
        "prompt_audio": None
        if request.prompt_audio is None
        else {
            "path": str(request.prompt_audio),
            "seconds_used": g.prompt_seconds,
            "continues_at": g.continues_at,
            "included_in_output": False,  # the files hold only the new music (see musiclm.generation.model)
        },
        "timings": {"load": load_s, **g.timings},
    }


def report(lm: MusicLM, output: Output, g: Generation, files: list[Path], record: dict, say: _Say) -> None:
    """Write the sidecar (not for stdout), say what was written, run the ``--audit``, and end with one
    line of timings."""
    audio_s = g.audio.shape[1] / g.sample_rate
    work_s = sum(v for k, v in g.timings.items() if k != "first_audio")
    stage_times = ", ".join(f"{k} {v:.1f} s" for k, v in g.timings.items() if k != "first_audio")
    if output.to_stdout:
        say(f"wrote {audio_s:.2f} s at {g.sample_rate} Hz to stdout (CLAP score {g.scores[0]:.3f})")
    else:
        _, sidecar, _ = output_paths(output.out, output.fmt, len(g.kept))
        sidecar.parent.mkdir(parents=True, exist_ok=True)
        sidecar.write_text(json.dumps(record, indent=2) + "\n")
        for p, i in zip(files, g.kept):
            say(f"wrote {p}  ({audio_s:.2f} s at {g.sample_rate} Hz, CLAP score {g.scores[i]:.3f}, sample {i} of {len(g.scores)})")
    first = f"; first audio after {g.timings['first_audio']:.1f} s" if output.stream and "first_audio" in g.timings else ""
    where = "" if output.to_stdout else f"settings in {sidecar}; "
    verdict = ""
    if output.audit is not None:
        verdict = "; " + _audit(files, output.audit, str(lm.device), record, sidecar, say)
    say(f"{where}{stage_times} (real-time factor {work_s / audio_s:.2f}, {lm.precision}{first}){verdict}")


def _audit(files: list[Path], data: str | Path, device: str, record: dict, sidecar: Path, say: _Say) -> str:
    """``--audit DIR``: audit the files just written against the corpus ``DIR``, print the report, add it to
    the sidecar; returns the verdict for the summary line. Generation's exit code does not depend on it."""
    from musiclm.commands.audit import audit, report_lines

    report = audit(files, data, device=device)
    for line in report_lines(report):
        say(line)
    record["audit"] = report
    sidecar.write_text(json.dumps(record, indent=2) + "\n")
    flagged = [f["file"] for f in report["files"] if f["flagged"]]
    return f"audit: {len(flagged)} of {len(files)} FLAGGED as near copies of training audio" if flagged else "audit: nothing flagged"


class _Say:
    """Messages for the user: stdout, unless stdout carries the audio (then stderr)."""

    def __init__(self, audio_on_stdout: bool):
        self.file = sys.stderr if audio_on_stdout else sys.stdout

    def __call__(self, line: str) -> None:
        print(line, file=self.file, flush=True)


class _AudioSink:
    """Writes audio chunks as they come: a WAV stream on stdout for ``out="-"``, else the output file
    (WAV or FLAC, the header finished when it closes). Used as ``with _AudioSink(...) as write: write(chunk)``."""

    def __init__(self, out: str | Path, fmt: str | None, sample_rate: int, samples: int):
        self.out, self.fmt, self.sample_rate, self.samples = out, fmt, sample_rate, samples

    def __enter__(self):
        from musiclm.pipeline.audio_out import WavStream

        if str(self.out) == STDOUT:
            self.writer = WavStream(sys.stdout.buffer, self.sample_rate, self.samples)
        else:
            import soundfile as sf

            path, _, kind = output_paths(self.out, self.fmt, 1)
            path[0].parent.mkdir(parents=True, exist_ok=True)
            self.writer = sf.SoundFile(path[0], "w", self.sample_rate, 1, format=kind.upper(), subtype="PCM_16")
        return self._write

    def _write(self, chunk) -> None:
        import numpy as np

        self.writer.write(np.clip(chunk, -1.0, 1.0))

    def __exit__(self, *exc) -> None:
        self.writer.close()


class _ProgressDisplay:
    """A rich progress bar per stage on a terminal (stderr), in seconds of audio; nothing otherwise."""

    def __enter__(self) -> Progress | None:
        from rich.console import Console

        console = Console(stderr=True)
        if not console.is_terminal:
            self.bar = None
            return None
        from rich.progress import BarColumn, Progress as RichProgress, TextColumn, TimeElapsedColumn

        self.bar = RichProgress(
            TextColumn("{task.description:>8}"), BarColumn(), TextColumn("{task.completed:.1f}/{task.total:.1f} s of audio"), TimeElapsedColumn(), console=console
        )  # fmt: skip
        self.tasks: dict[str, int] = {}
        self.bar.start()

        def update(stage: str, done: float, total: float) -> None:
            if stage not in self.tasks:
                self.tasks[stage] = self.bar.add_task(stage, total=total)
            self.bar.update(self.tasks[stage], completed=done)

        return update

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.stop()

