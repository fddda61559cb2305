"""What the tokenize job tells the user: its counts, the progress lines, the closing summary, why it stopped.

Layer: pipeline (imports the base layer and pipeline.batch_runner).

:class:`TokenizeSummary` is what a run did (``run_tokenize`` returns it); :class:`TokenizeProgress`
and :class:`FitProgress` are the rich progress lines of the main pass and of the fit;
:func:`print_summary` closes a run. A run that stops early says so in one line that names the
shards it kept (:func:`kept_shards`, :func:`stalled_error`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from musiclm.errors import UserError
from musiclm.pipeline.batch_runner import Stalled


@dataclass
class TokenizeSummary:
    """What a tokenize run did (run_tokenize returns it; the progress line reads it as it grows)."""

    files: int  # audio files found in the corpus
    skipped: int  # files finished by an earlier run (not counted below)
    clips: int  # segments tokenized by this run
    seconds: float  # audio seconds tokenized by this run
    failed: int  # error rows written by this run
    shards: int  # shards written by this run
    elapsed: float
    out: Path
    compute: float = 0.0  # seconds the actors spent in the tokenizer (summed over actors)
    repairs: list[str] = dataclasses.field(default_factory=list)  # what this run repaired, one line each
    reorder_peak: int = 0  # the most finished batches held at once, waiting for an earlier one (batch_runner)

    @property
    def audio_seconds_per_second(self) -> float:
        return self.seconds / self.elapsed if self.elapsed > 0 else 0.0


class TokenizeProgress:
    """A rich progress line over the planned audio: hours done, audio-seconds per second, ETA,
    how busy the actors are (and the GPU, where NVML reports it), clips and failures."""

    def __init__(self, console, total_seconds: float, workers: int):
        from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        self.p = Progress(
            SpinnerColumn(), TextColumn("tokenizing"), BarColumn(), TextColumn("{task.fields[text]}"), TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
            console=console, transient=False,
        )
        self.total = total_seconds
        self.workers = workers
        self.done = 0.0
        self.task = None

    def __enter__(self):
        self.p.__enter__()
        self.task = self.p.add_task("tokenize", total=max(self.total, 1e-9), text=f"0/{self.total / 3600:.2f} h")
        return self

    def update(self, seconds: float, s: TokenizeSummary, elapsed: float, gpu: float) -> None:
        self.done += seconds
        rate = s.seconds / elapsed if elapsed > 0 else 0.0
        busy = min(1.0, s.compute / (elapsed * self.workers)) if elapsed > 0 else 0.0
        text = f"{self.done / 3600:.2f}/{self.total / 3600:.2f} h, {rate:.1f} audio-s/s, actors {busy:.0%} busy"
        if gpu >= 0:
            text += f", GPU {gpu:.0f}%"
        text += f", {s.clips} clips, {s.failed} failed"
        self.p.update(self.task, completed=self.done, text=text)

    def __exit__(self, *exc):
        return self.p.__exit__(*exc)


class FitProgress:
    """A rich progress line over the files of the fit sample."""

    def __init__(self, console, files: int):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        self.p = Progress(SpinnerColumn(), TextColumn("fitting quantizers"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn(), console=console)
        self.files = files
        self.seen: set[str] = set()

    def __enter__(self):
        self.p.__enter__()
        self.task = self.p.add_task("fit", total=self.files)
        return self

    def update(self, rel: str) -> None:
        self.seen.add(rel)
        self.p.update(self.task, completed=len(self.seen))

    def __exit__(self, *exc):
        return self.p.__exit__(*exc)


def print_summary(console, s: TokenizeSummary) -> None:
    for line in s.repairs:
        console.print(line)
    console.print(
        f"tokenized {s.clips} clips ({s.seconds / 3600:.2f} h of audio) into {s.shards} shard{'' if s.shards == 1 else 's'} in {s.elapsed:.1f} s "
        f"({s.audio_seconds_per_second:.1f} audio-s/s); {s.skipped} of {s.files} files were already done"
    )
    if s.failed:
        console.print(f"{s.failed} files or segments failed; they are listed in {s.out / 'errors'}")
    console.print(f"output: {s.out}  (musiclm stats {s.out})")


def stalled_error(console, out: Path, e: Stalled, stall_seconds: float) -> UserError:
    """Print what Ray reports pending (one line each) and the one-line error that ends the run."""
    console.print(f"tokenize stalled: no batch finished for {e.seconds:.0f} s (tokenize.stall_seconds = {stall_seconds:g}); pending:")
    for line in e.lines:
        console.print(f"  {line}")
    return UserError(
        f"tokenize stalled (pending work listed above); {kept_shards(out)} kept: re-run the same command to resume, "
        "or raise tokenize.stall_seconds (--config) if a batch is really this slow"
    )


def kept_shards(out: Path) -> str:
    """``N shards``: the finished shards of ``out``."""
    n = len(list((out / "shards").glob("shard-*.tar")))
    return f"{n} shard{'s' if n != 1 else ''}"
